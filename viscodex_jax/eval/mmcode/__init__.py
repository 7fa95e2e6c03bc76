"""MMCode: ``benchmark`` (loader, official prompt and judge, pass@k) and ``harness`` (runs inside the sandbox)."""
