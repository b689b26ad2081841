"""Tests of the streaming service (consumers/): unit tests, and integration tests on the embedded broker."""

import warnings

# kafka-python 3.0.12 loads its protocol schemas with deprecated importlib.resources calls at import time
warnings.filterwarnings("ignore", message="(read|open)_text is deprecated", category=DeprecationWarning)
