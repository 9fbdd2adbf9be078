"""Contract suites: one per interface, subclassed once per backend (see each module)."""

import pytest

# Plain asserts in the shared suites report their operands like test files do.
pytest.register_assert_rewrite("contract.log_contract")
pytest.register_assert_rewrite("contract.capture_contract")
