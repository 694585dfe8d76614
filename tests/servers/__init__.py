"""Real servers started by the test suite (Redis, Valkey) on free local ports."""
