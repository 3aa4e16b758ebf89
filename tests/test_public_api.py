import slimformer


def test_every_export_resolves():
    for name in slimformer.__all__:
        assert getattr(slimformer, name) is not None, name


def test_unknown_attribute_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError):
        slimformer.nothing_here  # noqa: B018
