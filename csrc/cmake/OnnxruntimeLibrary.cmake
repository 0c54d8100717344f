# The onnxruntime shared library: the one the `onnxruntime` Python wheel installs, so the C library and the
# Python runtime run the same build.
set(ONNXRUNTIME_LIB "" CACHE FILEPATH "Path to libonnxruntime.so.X (empty: the Python wheel's)")
if(NOT ONNXRUNTIME_LIB)
  find_package(Python3 COMPONENTS Interpreter REQUIRED)
  execute_process(COMMAND ${Python3_EXECUTABLE} -c
                  "import glob, os, onnxruntime; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi', 'libonnxruntime.so*')))[0])"
                  OUTPUT_VARIABLE _lib OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0 OR NOT EXISTS "${_lib}")
    message(FATAL_ERROR "No onnxruntime library found through ${Python3_EXECUTABLE} (pip install onnxruntime), "
                        "or pass -DONNXRUNTIME_LIB=/path/libonnxruntime.so.X")
  endif()
  set(ONNXRUNTIME_LIB "${_lib}" CACHE FILEPATH "" FORCE)
endif()
# the wheel's file is libonnxruntime.so.1.X.Y but its soname is libonnxruntime.so.1: give the loader a link
# by that name beside the build, and an rpath to it
set(ONNXRUNTIME_LIB_DIR "${CMAKE_BINARY_DIR}/onnxruntime")
file(MAKE_DIRECTORY "${ONNXRUNTIME_LIB_DIR}")
file(CREATE_LINK "${ONNXRUNTIME_LIB}" "${ONNXRUNTIME_LIB_DIR}/libonnxruntime.so.1" SYMBOLIC)
add_library(onnxruntime SHARED IMPORTED)
set_target_properties(onnxruntime PROPERTIES IMPORTED_LOCATION "${ONNXRUNTIME_LIB_DIR}/libonnxruntime.so.1")
message(STATUS "onnxruntime: ${ONNXRUNTIME_LIB}")
