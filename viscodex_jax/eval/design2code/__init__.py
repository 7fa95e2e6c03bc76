"""Design2Code: ``benchmark`` (loader, prompt, scoring), ``official`` (the official visual metrics),
``render`` (headless Chromium screenshots)."""
