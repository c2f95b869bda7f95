import pytest

from headavatar.capture_id import validate_capture_id
from headavatar.errors import InvalidCaptureId
from headavatar.layout import stage_prefix


@pytest.mark.parametrize("good", ["018", "031", "A1", "cap_2024-01", "x" * 64])
def test_valid_ids(good: str) -> None:
    assert validate_capture_id(good) == good


@pytest.mark.parametrize("bad", [
    "../018", "018/..", "018;rm", "018 ", " 018", "", "x" * 65, "x" * 200, "018\n", "ü18", "０１８",
    "-018", "_018", "018$(id)", "018|ls", "a/b", "..", ".", "018\x00", None, 18,
])
def test_invalid_ids_rejected_before_any_key(bad: object) -> None:
    with pytest.raises(InvalidCaptureId) as e:
        validate_capture_id(bad)
    assert "invalid capture id" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InvalidCaptureId):
        stage_prefix(bad, "extract")  # type: ignore[arg-type]
