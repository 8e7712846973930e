"""The tenants' HTTP API: an OpenAI-compatible fine-tuning gateway in front of the scheduler's store (`app`)."""
