"""Reliability and security suite (issue 8): fault injection on the real embedded broker, fuzzing, security."""
