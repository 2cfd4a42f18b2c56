"""``mmssl evaluate`` / ``probe`` / ``retrieval`` / ``report``: one feature extractor and cache (`features`) behind
linear probes, retrieval, zero-shot, diagnostics, PID and robustness curves, and their reports and plots."""
