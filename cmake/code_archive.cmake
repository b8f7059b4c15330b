# Writes the code archive whose size is the artifact's "code bytes" (README, "Artifact size
# accounting"): the minified copies (STRIP = pgolf_code_strip) of the files listed in LIST (paths
# relative to SOURCE_DIR, one per line, sorted), tarred deterministically (fixed mtime, owner, group
# and modes), compressed with xz -9e, written to OUT.
# Usage: cmake -DSOURCE_DIR=... -DLIST=... -DSTRIP=... -DOUT=... -P code_archive.cmake
foreach(var SOURCE_DIR LIST STRIP OUT)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "code_archive.cmake: -D${var}=... is required")
  endif()
endforeach()
set(stripped "${OUT}.src")
execute_process(COMMAND "${STRIP}" "${SOURCE_DIR}" "${LIST}" "${stripped}" RESULT_VARIABLE strip_rc)
if(NOT strip_rc EQUAL 0)
  file(REMOVE_RECURSE "${stripped}")
  message(FATAL_ERROR "code_archive.cmake: ${STRIP} failed (exit code ${strip_rc})")
endif()
execute_process(
  COMMAND tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --mode=u=rwX,go=rX --format=gnu
          -C "${stripped}" -cf - -T "${LIST}"
  COMMAND xz -9e -T1 -c
  OUTPUT_FILE "${OUT}.tmp"
  RESULTS_VARIABLE results)
file(REMOVE_RECURSE "${stripped}")
foreach(rc IN LISTS results)
  if(NOT rc EQUAL 0)
    file(REMOVE "${OUT}.tmp")
    message(FATAL_ERROR "code_archive.cmake: tar | xz failed (exit codes ${results})")
  endif()
endforeach()
file(RENAME "${OUT}.tmp" "${OUT}")
