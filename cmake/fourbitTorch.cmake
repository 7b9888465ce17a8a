# Locates libtorch for fourbit::torch and defines the imported target fourbit::libtorch
# (torch's headers, the c10/torch_cpu/torch libraries, and c10_cuda/torch_cuda for a CUDA
# build). Used by fourbit's own build and, installed beside fourbitConfig.cmake, by
# find_package(fourbit COMPONENTS torch).
#
# find_package(Torch) is not used: it insists on a full CUDA toolkit (cuDNN, cuBLAS headers)
# for torch's CUDA builds, which fourbit does not use. The torch directory (the one holding
# include/ and lib/, e.g. site-packages/torch or an unpacked libtorch zip) is taken from,
# first found wins:
#   1. FOURBIT_TORCH_DIR (cache or environment variable);
#   2. Torch_DIR (torch's share/cmake/Torch directory), as find_package(Torch) takes it;
#   3. the directory recorded when fourbit was built (installed packages only), if it exists;
#   4. the Python interpreter (Python_EXECUTABLE, else python3 on PATH): torch's package dir.
# libtorch must be the one fourbit was built against (same version and C++ ABI).

function(fourbit_find_libtorch recorded_dir with_cuda)
  if(TARGET fourbit::libtorch)
    return()
  endif()
  set(_dir "")
  if(FOURBIT_TORCH_DIR)
    set(_dir "${FOURBIT_TORCH_DIR}")
  elseif(DEFINED ENV{FOURBIT_TORCH_DIR})
    set(_dir "$ENV{FOURBIT_TORCH_DIR}")
  elseif(Torch_DIR)
    get_filename_component(_dir "${Torch_DIR}/../../.." ABSOLUTE)
  elseif(recorded_dir AND EXISTS "${recorded_dir}/include/torch")
    set(_dir "${recorded_dir}")
  else()
    if(NOT Python_EXECUTABLE)
      find_package(Python COMPONENTS Interpreter QUIET)
    endif()
    if(NOT Python_EXECUTABLE)
      message(FATAL_ERROR "fourbit::torch: libtorch not found. Set FOURBIT_TORCH_DIR to the torch "
                          "directory (holding include/ and lib/), or Torch_DIR, or put a Python with "
                          "torch on PATH.")
    endif()
    execute_process(COMMAND "${Python_EXECUTABLE}" -c "import os, torch; print(os.path.dirname(torch.__file__))"
                    OUTPUT_VARIABLE _dir OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc ERROR_QUIET)
    if(NOT _rc EQUAL 0)
      message(FATAL_ERROR "fourbit::torch: '${Python_EXECUTABLE} -c \"import torch\"' failed; set "
                          "FOURBIT_TORCH_DIR to the torch directory (holding include/ and lib/)")
    endif()
  endif()
  if(NOT EXISTS "${_dir}/include/torch/library.h")
    message(FATAL_ERROR "fourbit::torch: '${_dir}' is not a torch directory (no include/torch/library.h); "
                        "FOURBIT_TORCH_DIR / Torch_DIR must point at torch's package or libtorch directory")
  endif()

  set(_libs c10 torch_cpu torch)
  if(with_cuda)
    list(APPEND _libs c10_cuda torch_cuda)
  endif()
  set(_paths "")
  foreach(_lib ${_libs})
    unset(_path CACHE)
    find_library(_path NAMES ${_lib} PATHS "${_dir}/lib" NO_DEFAULT_PATH)
    if(NOT _path)
      message(FATAL_ERROR "fourbit::torch: lib${_lib} not found in '${_dir}/lib'")
    endif()
    list(APPEND _paths "${_path}")
    unset(_path CACHE)
  endforeach()

  add_library(fourbit::libtorch INTERFACE IMPORTED GLOBAL)
  set_target_properties(fourbit::libtorch PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${_dir}/include;${_dir}/include/torch/csrc/api/include"
    INTERFACE_LINK_LIBRARIES "${_paths}"
    # torch >= 2.9 ships only the C++11 ABI; its headers need C++17 at least, recent ones C++20.
    INTERFACE_COMPILE_DEFINITIONS "_GLIBCXX_USE_CXX11_ABI=1"
    INTERFACE_COMPILE_FEATURES cxx_std_20)
  set(FOURBIT_LIBTORCH_DIR "${_dir}" PARENT_SCOPE)
  message(STATUS "fourbit::torch: libtorch from ${_dir}")
endfunction()
