# Joins the per-object ptxas logs written by tools/ptxas_log.sh into one report
# that ships next to the library (skipdit_fast/_C.ptxas.txt).
# Usage: cmake -DLOG_DIR=... -DOUT=... -P join_ptxas_logs.cmake
file(GLOB _logs "${LOG_DIR}/*.log")
list(SORT _logs)
set(_text "")
foreach(_f IN LISTS _logs)
  file(READ "${_f}" _c)
  get_filename_component(_n "${_f}" NAME)
  string(APPEND _text "### ${_n}\n${_c}\n")
endforeach()
file(WRITE "${OUT}" "${_text}")
