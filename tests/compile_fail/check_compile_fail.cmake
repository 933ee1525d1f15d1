# cmake -D CXX_COMPILER=... -D SOURCE=case.cpp -D INCLUDE_DIRS="a|b" -D COMPILE_FLAGS="..."
#       -P check_compile_fail.cmake
# Passes when SOURCE fails to compile and the output contains every `// expect: ` text of it.
file(STRINGS "${SOURCE}" expect_lines REGEX "^// expect: ")
file(STRINGS "${SOURCE}" flag_lines REGEX "^// flags: ")
if(NOT expect_lines)
  message(FATAL_ERROR "${SOURCE}: no `// expect: <message>` line")
endif()

set(arguments -std=c++17 -fsyntax-only)
string(REPLACE "|" ";" include_dirs "${INCLUDE_DIRS}")
foreach(dir IN LISTS include_dirs)
  if(dir)
    list(APPEND arguments "-I${dir}")
  endif()
endforeach()
separate_arguments(compile_flags UNIX_COMMAND "${COMPILE_FLAGS}")
list(APPEND arguments ${compile_flags})
foreach(line IN LISTS flag_lines)
  string(REGEX REPLACE "^// flags: " "" flags "${line}")
  separate_arguments(flags UNIX_COMMAND "${flags}")
  list(APPEND arguments ${flags})
endforeach()

execute_process(
  COMMAND "${CXX_COMPILER}" ${arguments} "${SOURCE}"
  RESULT_VARIABLE result
  OUTPUT_VARIABLE output
  ERROR_VARIABLE output)
if(result EQUAL 0)
  message(FATAL_ERROR "${SOURCE} compiled, but it must fail with: ${expect_lines}")
endif()
foreach(line IN LISTS expect_lines)
  string(REGEX REPLACE "^// expect: " "" expected "${line}")
  string(FIND "${output}" "${expected}" position)
  if(position EQUAL -1)
    message(FATAL_ERROR
      "${SOURCE} failed to compile, but without the expected text\n  ${expected}\n"
      "Compiler output:\n${output}")
  endif()
endforeach()
message(STATUS "${SOURCE}: fails as expected")
