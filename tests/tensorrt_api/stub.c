/* Stand-in for TensorRT's shared libraries: the C entry points its Python bindings link against, each returning
   null. Enough to import the bindings and read their classes, enums and signatures (what the API check needs);
   nothing can be built or run with it: trt.Builder(logger) raises "factory function returned nullptr".
   Built as libnvinfer.so.N, libnvonnxparser.so.N and libnvinfer_plugin.so.N by the Makefile's tensorrt-api. */
void *createInferBuilder_INTERNAL(void *logger, int version) { return 0; }
void *createInferRuntime_INTERNAL(void *logger, int version) { return 0; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return 0; }
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return 0; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return 0; }
void *getBuilderPluginRegistry(int capability) { return 0; }
void *getPluginRegistry(void) { return 0; }
int getNvOnnxParserVersion(void) { return 0; }
int initLibNvInferPlugins(void *logger, const char *plugin_namespace) { return 0; }
