"""XMP sidecars: zsclip's keywords merged into what other programs wrote, replaced on reruns,
removed again; hostile sidecars refused and left untouched."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from zsclip.jobs.xmp import (
    XmpError,
    read_tags,
    remove_tags,
    sidecars_of,
    tag_image,
)
from zsclip.jobs.xmp_packet import MAX_SIDECAR_BYTES, NS_DC, NS_LR

RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DARKTABLE = "http://darktable.sf.net/"
# A sidecar as darktable/exiftool-style tools write it, with fields zsclip must keep: attributes,
# a struct in a sequence, a language alternative, a comment, a namespace of its own with a default
# namespace inside, and a keyword of the user's that is also one of zsclip's labels.
FOREIGN = """<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:darktable="http://darktable.sf.net/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmp:Rating="4"
    darktable:xmp_version="5">
   <!-- edited in darktable -->
   <darktable:history>
    <rdf:Seq>
     <rdf:li darktable:operation="exposure" darktable:enabled="1" darktable:params="0000c03f"/>
    </rdf:Seq>
   </darktable:history>
   <dc:title><rdf:Alt><rdf:li xml:lang="x-default">Beach &amp; dog</rdf:li></rdf:Alt></dc:title>
   <dc:subject>
    <rdf:Bag>
     <rdf:li>holiday</rdf:li>
     <rdf:li>dog</rdf:li>
    </rdf:Bag>
   </dc:subject>
   <darktable:extra><note xmlns="urn:example:plain">kept as is</note></darktable:extra>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


def image(folder: Path, name: str = "IMG_1.jpg") -> Path:
    path = folder / name
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg, and never opened for writing")
    return path


def tree(path: Path) -> ET.Element:
    return ET.fromstring(path.read_bytes())


def bag(root: ET.Element, prop: str) -> list[str]:
    found = root.find(f".//{prop}")
    return [] if found is None else [li.text for li in found.iter(f"{{{RDF}}}li")]


def others(root: ET.Element) -> list[tuple]:
    """Everything in the sidecar that is not a keyword bag: tags, attributes and text."""
    skip = {
        f"{{{NS_DC}}}subject",
        f"{{{NS_LR}}}hierarchicalSubject",
        "{urn:x-zsclip:xmp:1.0/}Keywords",
    }
    kept = []

    def walk(element: ET.Element) -> None:
        for child in element:
            if child.tag not in skip:
                kept.append((child.tag, dict(child.attrib), (child.text or "").strip()))
                walk(child)

    walk(root)
    return kept


def test_keywords_merge_into_another_programs_sidecar_and_keep_its_fields(tmp_path: Path) -> None:
    photo = image(tmp_path)
    photo_bytes = photo.read_bytes()
    sidecar = tmp_path / "IMG_1.jpg.xmp"
    sidecar.write_text(FOREIGN)
    before = others(tree(sidecar))
    assert tag_image(str(photo), ["dog", "beach"]) == [str(sidecar)]
    root = tree(sidecar)
    assert bag(root, f"{{{NS_DC}}}subject") == ["holiday", "dog", "beach"]
    assert bag(root, f"{{{NS_LR}}}hierarchicalSubject") == ["zsclip|dog", "zsclip|beach"]
    assert others(root) == before  # rating, history, title, comment-free structure all kept
    text = sidecar.read_text()
    assert (
        "<!-- edited in darktable -->" in text
        and 'xmlns:darktable="http://darktable.sf.net/"' in text
    )
    assert "darktable:operation=" in text and 'xml:lang="x-default"' in text
    assert photo.read_bytes() == photo_bytes


def test_reruns_replace_zsclip_keywords_instead_of_piling_them_up(tmp_path: Path) -> None:
    photo = image(tmp_path)
    sidecar = tmp_path / "IMG_1.jpg.xmp"
    sidecar.write_text(FOREIGN)
    tag_image(str(photo), ["dog", "beach"])
    first = sidecar.read_bytes()
    tag_image(str(photo), ["dog", "beach"])
    assert sidecar.read_bytes() == first  # the same labels again change nothing
    tag_image(str(photo), ["cat"])
    root = tree(sidecar)
    # "dog" was the user's before zsclip: it stays; "beach" was zsclip's: it goes
    assert bag(root, f"{{{NS_DC}}}subject") == ["holiday", "dog", "cat"]
    assert bag(root, f"{{{NS_LR}}}hierarchicalSubject") == ["zsclip|cat"]
    assert read_tags(str(photo)) == {str(sidecar): ["cat"]}


def test_remove_takes_out_only_zsclips_keywords(tmp_path: Path) -> None:
    photo = image(tmp_path)
    sidecar = tmp_path / "IMG_1.jpg.xmp"
    sidecar.write_text(FOREIGN)
    before = tree(sidecar)
    tag_image(str(photo), ["dog", "beach"])
    assert remove_tags(str(photo)) == [str(sidecar)]
    after = tree(sidecar)
    assert bag(after, f"{{{NS_DC}}}subject") == ["holiday", "dog"]
    assert after.find(f".//{{{NS_LR}}}hierarchicalSubject") is None
    assert others(after) == others(before)
    assert "zsclip" not in sidecar.read_text()
    assert remove_tags(str(photo)) == []  # nothing left to remove


def test_a_new_sidecar_is_made_for_labels_and_removed_with_them(tmp_path: Path) -> None:
    photo = image(tmp_path)
    assert tag_image(str(photo), []) == []  # no labels: no sidecar made
    assert not list(tmp_path.glob("*.xmp"))
    [written] = tag_image(str(photo), ["sunset"])
    assert written == str(photo) + ".xmp"
    assert bag(tree(Path(written)), f"{{{NS_DC}}}subject") == ["sunset"]
    remove_tags(str(photo))
    assert not Path(written).exists()  # it held nothing else


def test_lightroom_named_sidecar_is_updated_unless_another_file_shares_the_stem(
    tmp_path: Path,
) -> None:
    photo = image(tmp_path)
    lightroom = tmp_path / "IMG_1.xmp"
    lightroom.write_text(FOREIGN)
    assert sidecars_of(str(photo)) == [str(lightroom)]
    tag_image(str(photo), ["dog"])
    assert bag(tree(lightroom), f"{{{NS_LR}}}hierarchicalSubject") == ["zsclip|dog"]
    raw = image(tmp_path, "IMG_2.jpg")
    (tmp_path / "IMG_2.cr2").write_bytes(b"raw")
    shared = tmp_path / "IMG_2.xmp"
    shared.write_text(FOREIGN)
    tag_image(str(raw), ["dog"])
    assert shared.read_text() == FOREIGN  # the RAW's sidecar is not the JPEG's
    assert (tmp_path / "IMG_2.jpg.xmp").exists()


def test_a_symlinked_sidecar_is_followed_and_stays_a_link(tmp_path: Path) -> None:
    photo = image(tmp_path)
    real = tmp_path / "elsewhere.xmp"
    real.write_text(FOREIGN)
    (tmp_path / "IMG_1.jpg.xmp").symlink_to(real)
    tag_image(str(photo), ["dog", "cat"])
    assert (tmp_path / "IMG_1.jpg.xmp").is_symlink()
    assert bag(tree(real), f"{{{NS_LR}}}hierarchicalSubject") == ["zsclip|dog", "zsclip|cat"]


BILLION_LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">'
    + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(8))
    + ']>\n<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="'
    + RDF
    + '"><rdf:Description>&i;</rdf:Description></rdf:RDF></x:xmpmeta>'
)


@pytest.mark.parametrize(
    "content, message",
    [
        (BILLION_LAUGHS.encode(), "DOCTYPE"),
        (b'<!DOCTYPE x SYSTEM "file:///etc/passwd"><x/>', "DOCTYPE"),
        ('<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE x []><x/>'.encode("utf-16"), "DOCTYPE"),
        (b'<x:xmpmeta xmlns:x="adobe:ns:meta/">&ext;</x:xmpmeta>', "not valid XML"),
        (b"<x:xmpmeta", "not valid XML"),
        (b"\xff\xfe\x00garbage", "not valid XML"),
        (b"<html><body>not xmp</body></html>", "not an XMP sidecar"),
        (b"<a>" * 100 + b"</a>" * 100, "nested deeper"),
        (b" " * (MAX_SIDECAR_BYTES + 1), "larger than"),
    ],
)
def test_hostile_sidecars_are_refused_in_one_line_and_left_untouched(
    tmp_path: Path, content: bytes, message: str
) -> None:
    photo = image(tmp_path)
    sidecar = tmp_path / "IMG_1.jpg.xmp"
    sidecar.write_bytes(content)
    for action in (lambda: tag_image(str(photo), ["dog"]), lambda: remove_tags(str(photo))):
        with pytest.raises(XmpError, match=message) as caught:
            action()
        assert "\n" not in str(caught.value) and str(sidecar) in str(caught.value)
        assert sidecar.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["IMG_1.jpg", "IMG_1.jpg.xmp"]


def test_a_fifo_named_like_a_sidecar_is_refused_without_blocking(tmp_path: Path) -> None:
    import os

    photo = image(tmp_path)
    os.mkfifo(tmp_path / "IMG_1.jpg.xmp")
    with pytest.raises(XmpError, match="not a regular file"):
        tag_image(str(photo), ["dog"])


def test_labels_with_markup_and_bars_are_written_as_text(tmp_path: Path) -> None:
    photo = image(tmp_path)
    [written] = tag_image(str(photo), ["<b>&amp;", "rock|pop", "bell\x07"])
    root = tree(Path(written))
    assert bag(root, f"{{{NS_DC}}}subject") == ["<b>&amp;", "rock|pop", "bell "]
    assert bag(root, f"{{{NS_LR}}}hierarchicalSubject")[1] == "zsclip|rock/pop"


def test_a_missing_image_gets_no_sidecar(tmp_path: Path) -> None:
    with pytest.raises(XmpError, match="no such image"):
        tag_image(str(tmp_path / "gone.jpg"), ["dog"])
    assert not list(tmp_path.iterdir())
