"""Browser tests of the /multi_demo/ page (headless Chromium through Playwright)."""
