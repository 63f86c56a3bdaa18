"""The Ray Serve application (OpenAI-compatible routes for distilled students): issue 4, not built yet."""
