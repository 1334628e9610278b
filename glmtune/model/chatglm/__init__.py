"""Native ChatGLM models (no remote code)."""
