"""chat-runner: replay multi-turn conversations through open LLMs, configured with Hydra."""
