"""Backend-independent contract suites (mixins); backends subclass them in tests/integration."""
