"""The OpenAI-compatible API backend: callers, keys, rate limits, answers, cost, the Batch API."""
