"""Real servers speaking the providers' wire protocols, for tests, the demo and load tests."""
