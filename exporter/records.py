"""Records of an input file, judged before any model work, in chunks: what `embed` and `predict` run, locally or
on a cluster (where the reader runs apart from the driver and judges records alike)."""

from __future__ import annotations

from utr_runtime.bundle import NOT_PRINTABLE

MAX_ID_LENGTH = 256  # ids are stored whole in every output; a longer "id" is a wrong file or a FASTA header gone awry


def valid_chunks(input: str, column: str | None, chunk: int, check, judged, skip: bool, max_length: int):
    """Lists of up to `chunk` good (name, sequence) records; each bad one goes to `judged(name, reason)`."""
    import itertools

    from utr_runtime.sequences import read_sequences

    records, seen = read_sequences(input, column=column, unique=False, max_length=max_length), set()
    while batch := list(itertools.islice(records, chunk)):
        good = []
        for (name, seq), problem in zip(batch, check([s for _, s in batch])):
            if len(name) > MAX_ID_LENGTH:
                judged(name[:40] + "...", f"id of {len(name):,} characters; ids are at most {MAX_ID_LENGTH}")
            elif NOT_PRINTABLE.search(name):  # ">a\0" and ">a" were one id in .npz (NumPy strips trailing NULs)
                judged(name.encode("unicode_escape").decode("ascii"), "control character in the id (ids are printable text)")
            elif name in seen:
                judged(name, f"duplicate sequence id {name!r}" + (" (the first record with it is kept)" if skip else ""))
            elif problem:
                judged(name, problem)
            else:
                good.append((name, seq))
            seen.add(name)
        if good:
            yield good


class Judge:
    """What happens to a bad record, one rule for every command: an InputError naming it (`where(name)`, such as
    "FILE: record 'x'" or "variant 'x'"), or with `skip` left out and listed in `skipped` (id, reason) for the
    OUTPUT.skipped.tsv report."""

    def __init__(self, skip: bool, where, skipped: list[tuple[str, str]] | None = None):
        self.skip, self.where, self.skipped = skip, where, skipped if skipped is not None else []

    def __call__(self, name: str, reason: str) -> None:
        from utr_runtime.errors import InputError

        if not self.skip:
            raise InputError(f"{self.where(name)}: {reason}")
        self.skipped.append((name, reason))
