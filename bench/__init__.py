"""mtlfast benchmark harness.

One registry of workloads (``bench/workloads/<op>.py``), one provider mechanism
(``providers``), one timer (``timer``), one result schema (``records``) and one report
(``report``), driven through pytest-benchmark by ``python -m bench``.  See ``bench/README.md``.
"""
