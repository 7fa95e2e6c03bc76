"""InfiBench-V: ``benchmark`` (loader and scoring), ``spec`` (the official case YAMLs), ``match`` (keyword,
blank-filling and similarity graders), ``unit_tests`` (sandboxed unit-test grading), ``flat`` (the earlier
questions.jsonl layout), ``judge`` (optional LLM judge), ``check`` (agreement with the official scores)."""
