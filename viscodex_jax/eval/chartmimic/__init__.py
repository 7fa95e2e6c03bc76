"""ChartMimic direct mimic: ``benchmark`` (loader, prompt, class), ``metrics`` (the official low-level F1s),
``programs`` (sandboxed chart runs), ``harness`` (runs inside the sandbox), ``check`` (agreement with the
official scores), ``samples`` (charts for tests and the demo)."""
