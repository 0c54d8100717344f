# onnxruntime's C API header. The onnxruntime Python wheel ships the shared library but no headers, and
# this project does not vendor third-party code, so the header comes from Debian's archive: the
# libonnxruntime-dev package of Debian 13 (trixie, a stable release), pinned by sha256. It declares C API
# version 21; onnxruntime's C API only ever appends, so a newer library (the wheel's) serves version 21
# unchanged. The package's copyright file (MIT) is kept beside the header.
set(ONNXRUNTIME_INCLUDE_DIR "" CACHE PATH "Folder holding onnxruntime_c_api.h (empty: fetch it)")
if(NOT ONNXRUNTIME_INCLUDE_DIR)
  set(_deb_url "http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb")
  set(_deb_sha256 "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
  set(_cache "$ENV{HOME}/.cache/steerguard/onnxruntime-headers-1.21.0")
  if(NOT EXISTS "${_cache}/include/onnxruntime/onnxruntime_c_api.h")
    message(STATUS "Fetching onnxruntime's C API header from ${_deb_url}")
    file(DOWNLOAD "${_deb_url}" "${_cache}/pkg.deb" EXPECTED_HASH SHA256=${_deb_sha256} STATUS _status TLS_VERIFY ON
         INACTIVITY_TIMEOUT 30)
    list(GET _status 0 _code)
    if(NOT _code EQUAL 0)
      set(ONNXRUNTIME_HEADER_ERROR "cannot fetch onnxruntime's header (${_status}); pass "
                                   "-DONNXRUNTIME_INCLUDE_DIR=<folder with onnxruntime_c_api.h>")
      return()
    endif()
    # a .deb is an ar archive holding data.tar.xz
    execute_process(COMMAND ar x pkg.deb WORKING_DIRECTORY "${_cache}" RESULT_VARIABLE _ar)
    file(GLOB _data "${_cache}/data.tar.*")
    execute_process(COMMAND ${CMAKE_COMMAND} -E tar xf ${_data} WORKING_DIRECTORY "${_cache}" RESULT_VARIABLE _tar)
    if(NOT _ar EQUAL 0 OR NOT _tar EQUAL 0)
      set(ONNXRUNTIME_HEADER_ERROR "cannot unpack ${_cache}/pkg.deb (needs binutils' ar)")
      return()
    endif()
    file(MAKE_DIRECTORY "${_cache}/include")
    file(RENAME "${_cache}/usr/include/onnxruntime" "${_cache}/include/onnxruntime")
    file(COPY "${_cache}/usr/share/doc/libonnxruntime-dev/copyright" DESTINATION "${_cache}/include/onnxruntime")
    file(REMOVE_RECURSE "${_cache}/usr" "${_cache}/pkg.deb" ${_data} "${_cache}/control.tar.xz" "${_cache}/debian-binary")
  endif()
  set(ONNXRUNTIME_INCLUDE_DIR "${_cache}/include/onnxruntime" CACHE PATH "" FORCE)
endif()
if(NOT EXISTS "${ONNXRUNTIME_INCLUDE_DIR}/onnxruntime_c_api.h")
  set(ONNXRUNTIME_HEADER_ERROR "${ONNXRUNTIME_INCLUDE_DIR} has no onnxruntime_c_api.h")
  set(ONNXRUNTIME_INCLUDE_DIR "")
endif()
