"""The README works as pasted: every shell command and Python example runs, in order, from the repository root.

It runs in a scratch folder that links the repository's data (so outputs land there, not in the clone), with only
the substitutions the README itself defines (BUNDLE, INPUT, OUT). A command that cannot run on a machine without
the model hub, a GPU or a package index is listed in NOT_RUN with the reason; a stale entry fails the test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# What the README says its placeholders stand for (checked below to be what it says).
PLACEHOLDERS = {"BUNDLE": "bundles/utrbert-6mer-random", "INPUT": "calibration/data/utrbert_seq_to_extract.fasta", "OUT": "out.tsv"}
NOT_RUN = {
    "make build": "the set-up command itself (this test runs the build it performs, `utrexport build --random-init`)",
    "make test": "the set-up command itself: it runs this test",
    "pip ": "installs packages; the suite runs in the environment `make test` installed",
    "utrexport build --kmer 6  ": "downloads from the model hub, which this machine cannot reach",
    "--hub ORG/NAME": "downloads from the model hub, which this machine cannot reach",
    "--checkpoint path/to/folder": "a placeholder for your own checkpoint (the classifier build below runs the same path)",
    "utrexport engine": "needs an NVIDIA GPU and TensorRT",
    "--device tensorrt": "needs an NVIDIA GPU and TensorRT",
    "device='tensorrt'": "needs an NVIDIA GPU and TensorRT",
    "benchmarks/tensorrt_gpu.sh": "needs an NVIDIA GPU and TensorRT",
    "make tensorrt-api": "downloads about 60 MB of TensorRT and cuda-python wheels and needs a C compiler (run by hand)",
    "ray start": "starts a Ray cluster that outlives the command (the local --ray run below starts and stops its own)",
    "--ray auto": "joins a running Ray cluster",
    "utrexport serve": "serves until stopped (tests/test_serving.py runs serve, and the requests below against it)",
    "curl ": "needs the server above (tests/test_serving.py runs these requests against one)",
    "tritonclient": "needs the server above (tests/test_serving.py runs this example against one)",
    "from openai import OpenAI": "needs the server above (tests/test_serving.py runs this example against one)",
    "docker run": "needs Docker, NVIDIA's Triton container and a GPU",
    "bcftools ": "needs bcftools, a Debian package (tests/test_variants.py queries the index with pysam, and with bcftools where installed)",
}
LINKED = ("calibration", "tests", "benchmarks", "docs", "clients")


def examples() -> list[tuple[str, str]]:
    """(language, text) of every bash command line and python block, in README order."""
    found = []
    for language, body in re.findall(r"```(bash|python)\n(.*?)```", README, re.S):
        if language == "python":
            found.append(("python", body))
            continue
        for line in body.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()  # comments after the command
            if command:
                found.append(("bash", line.rstrip()))
    return found


def not_run(text: str) -> str | None:
    return next((reason for pattern, reason in NOT_RUN.items() if pattern in text), None)


def test_placeholders_are_the_ones_the_readme_defines():
    prose = " ".join(README.split())  # line breaks fall anywhere in a paragraph
    for name, value in PLACEHOLDERS.items():
        assert f"`{name}` stands for" in prose or f"`{name}` for" in prose, name
        assert f"(such as `{value}`)" in prose, value


def test_every_skip_reason_still_applies():
    texts = [text for _, text in examples()]
    for pattern in NOT_RUN:
        assert any(pattern in text for text in texts), f"NOT_RUN entry {pattern!r} matches nothing in the README"


def run_readme(folder: Path) -> int:
    """Run every README command and example in order in `folder` (linking the repository's data); how many ran."""
    for name in LINKED:
        (folder / name).symlink_to(ROOT / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    ran = 0
    for language, text in examples():
        if not_run(text):
            continue
        if language == "bash":
            command = text
            for name, value in PLACEHOLDERS.items():
                command = re.sub(rf"\b{name}\b", value, command)
            done = subprocess.run(command, shell=True, cwd=folder, env=env, capture_output=True, text=True, timeout=900)
        else:
            done = subprocess.run([sys.executable, "-c", text], cwd=folder, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0 and "Traceback" not in done.stderr, f"README {language} failed:\n{text}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        ran += 1
    return ran


def test_the_readme_runs_as_pasted(readme_run):
    folder, ran = readme_run  # conftest: run once per session; its full-size bundle serves tests/test_full_size.py too
    assert ran >= 10
    assert (folder / "bundles" / "utrbert-6mer-random" / "manifest.json").is_file() and (folder / "vectors.npz").is_file()
    assert (folder / "predictions.tsv").read_text().startswith("id\tlabel\tpositive") and (folder / "out.tsv").is_file()
    assert (folder / "triton-repo" / "embed" / "config.pbtxt").is_file() and (folder / "triton-repo-gpu" / "embed" / "config.pbtxt").is_file()
