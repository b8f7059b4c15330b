# Writes the code archive whose size is the artifact's "code bytes" (README, "Artifact size
# accounting"): a tar of the files listed in LIST (paths relative to SOURCE_DIR, one per line, sorted),
# made deterministic (fixed mtime, owner, group and modes), compressed with xz -9e, written to OUT.
# Usage: cmake -DSOURCE_DIR=... -DLIST=... -DOUT=... -P code_archive.cmake
foreach(var SOURCE_DIR LIST OUT)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "code_archive.cmake: -D${var}=... is required")
  endif()
endforeach()
execute_process(
  COMMAND tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --mode=u=rwX,go=rX --format=gnu
          -C "${SOURCE_DIR}" -cf - -T "${LIST}"
  COMMAND xz -9e -T1 -c
  OUTPUT_FILE "${OUT}.tmp"
  RESULTS_VARIABLE results)
foreach(rc IN LISTS results)
  if(NOT rc EQUAL 0)
    file(REMOVE "${OUT}.tmp")
    message(FATAL_ERROR "code_archive.cmake: tar | xz failed (exit codes ${results})")
  endif()
endforeach()
file(RENAME "${OUT}.tmp" "${OUT}")
