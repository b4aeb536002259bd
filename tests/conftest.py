import pytest


@pytest.fixture(scope="session")
def mini_root(tmp_path_factory):
    """The default miniature datasets, generated once per test session (read-only for tests)."""
    from transfer.minidata import make_mini

    root = tmp_path_factory.mktemp("mini")
    make_mini(root, seed=0)
    return root
