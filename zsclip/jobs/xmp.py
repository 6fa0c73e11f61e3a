"""Keywords in XMP sidecars, for photo managers (darktable, digiKam, Lightroom, Bridge, exiftool).

`tag_image(IMG_1.jpg, ["dog", "beach"])` writes the labels as keywords twice, as photo managers read
them: each in the `dc:subject` bag, and as `zsclip|dog` in `lr:hierarchicalSubject` (one `zsclip`
branch in the keyword tree). The image itself is never opened for writing.

Which sidecar: zsclip writes `IMG_1.jpg.xmp` (darktable's and digiKam's name: one sidecar per file,
so IMG_1.jpg and IMG_1.cr2 never share one). An existing `IMG_1.xmp` (Lightroom's and Bridge's name)
is updated too, unless another image in the folder has the same stem (a RAW+JPEG pair, whose `.xmp`
belongs to the RAW).

Merging: a sidecar is parsed, changed in place and written back atomically (zsclip.atomic); every
element, attribute, namespace and comment that zsclip does not own stays as it was. zsclip owns the
`zsclip|...` entries of `lr:hierarchicalSubject` and the `dc:subject` entries it added, which it
lists in its own property `zsclip:Keywords`: a keyword that was already there is not listed, so it
survives when zsclip's are replaced (a rerun) or removed (`remove_tags`).

Sidecars are hostile input: zsclip.jobs.xmp_packet reads them without DTDs or entities and with
size and depth limits. A refused sidecar is left untouched.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from typing import Callable

from zsclip.jobs.xmp_packet import (
    DESCRIPTION,
    NS_DC,
    NS_LR,
    NS_RDF,
    NS_ZSCLIP,
    PREFIXES,
    Packet,
    XmpError,
    new_packet,
    rdf_of,
    read_packet,
    serialize,
)

HIERARCHY_ROOT = "zsclip"  # lr:hierarchicalSubject entries are "zsclip|LABEL"
_LI = f"{{{NS_RDF}}}li"
_BAG = f"{{{NS_RDF}}}Bag"
_SUBJECT = f"{{{NS_DC}}}subject"
_HIERARCHICAL = f"{{{NS_LR}}}hierarchicalSubject"
_OWN = f"{{{NS_ZSCLIP}}}Keywords"
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

__all__ = ["XmpError", "read_tags", "remove_tags", "sidecars_of", "tag_image"]


# ------------------------------------------------------------------------------ which sidecars


def _candidates(image: str) -> tuple[str, str]:
    """(IMG_1.jpg.xmp, IMG_1.xmp)."""
    return image + ".xmp", os.path.splitext(image)[0] + ".xmp"


def _stem_shared(image: str) -> bool:
    """Another file in the image's folder has the same stem (IMG_1.jpg beside IMG_1.cr2)."""
    folder, name = os.path.split(image)
    stem = os.path.splitext(name)[0]
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return True  # cannot tell: do not touch a sidecar that might be another file's
    return any(
        other != name and os.path.splitext(other)[0] == stem and not other.lower().endswith(".xmp")
        for other in names
    )


def sidecars_of(image: str) -> list[str]:
    """The sidecars of `image` that exist and are zsclip's to update (see the module docstring)."""
    own, shared = _candidates(image)
    found = [own] if os.path.lexists(own) else []
    if shared != own and os.path.lexists(shared) and not _stem_shared(image):
        found.append(shared)
    return found


# ------------------------------------------------------------------------------ keywords


def _bag_items(prop: ET.Element) -> list[ET.Element]:
    container = next(iter(prop), None)  # rdf:Bag (or a Seq/Alt some tools write)
    return [] if container is None else [li for li in container if li.tag == _LI]


def _text(li: ET.Element) -> str:
    return (li.text or "").strip()


def hierarchical_name(label: str) -> str:
    """`zsclip|LABEL`; a `|` inside a label would start a new level, so it becomes `/`."""
    return f"{HIERARCHY_ROOT}|{label.replace('|', '/')}"


def _clean(label: str) -> str:
    return _XML_INVALID.sub(" ", label)


def zsclip_keywords(packet: Packet) -> list[str]:
    """The labels zsclip wrote into this packet (its `zsclip|...` hierarchical keywords)."""
    prefix = HIERARCHY_ROOT + "|"
    found = []
    for description in rdf_of(packet.root).iter(DESCRIPTION):
        for prop in description.findall(_HIERARCHICAL):
            found += [
                _text(li)[len(prefix) :] for li in _bag_items(prop) if _text(li).startswith(prefix)
            ]
    return found


def _remove_own(packet: Packet) -> bool:
    """Take out everything zsclip wrote before; True when something was removed."""
    rdf = rdf_of(packet.root)
    added: set[str] = set()
    removed = False
    for description in rdf.iter(DESCRIPTION):
        for own in description.findall(_OWN):
            added.update(_text(li) for li in _bag_items(own))
            _drop(description, own)
            removed = True
    for description in rdf.iter(DESCRIPTION):
        for prop, owned in ((_SUBJECT, added.__contains__), (_HIERARCHICAL, _is_hierarchical)):
            for element in description.findall(prop):
                removed |= _drop_items(description, element, owned)
    if removed:
        _prune_declarations(packet, (NS_ZSCLIP, NS_LR))
    return removed


def _prune_declarations(packet: Packet, uris: tuple[str, ...]) -> None:
    """Drop the declarations of `uris` that no element or attribute uses any more."""
    used = set()
    for element in packet.root.iter():
        if isinstance(element.tag, str):
            used.update(
                name[1:].split("}")[0] for name in [element.tag, *element.attrib] if name[:1] == "{"
            )
    for element, declared in packet.declarations.items():
        declared[:] = [(p, uri) for p, uri in declared if uri not in uris or uri in used]


def _is_hierarchical(text: str) -> bool:
    return text.startswith(HIERARCHY_ROOT + "|")


def _drop_items(parent: ET.Element, prop: ET.Element, owned: Callable[[str], bool]) -> bool:
    """Remove the owned entries of a bag; the bag too when zsclip's were all it held."""
    items = _bag_items(prop)
    mine = [li for li in items if owned(_text(li))]
    if not mine:
        return False
    container = next(iter(prop))
    for li in mine:
        _drop(container, li)
    if len(mine) == len(items):
        _drop(parent, prop)
    return True


def _drop(parent: ET.Element, child: ET.Element) -> None:
    """Remove `child`, keeping the layout: the whitespace before it stays with what came before."""
    index = list(parent).index(child)
    if index == 0:
        parent.text = child.tail if child.tail is not None else parent.text
    else:
        parent[index - 1].tail = child.tail
    parent.remove(child)


def _target_description(packet: Packet) -> ET.Element:
    """The rdf:Description that holds dc:subject, else the first one (made when there is none)."""
    rdf = rdf_of(packet.root)
    descriptions = [d for d in rdf if d.tag == DESCRIPTION]
    for description in descriptions:
        if description.find(_SUBJECT) is not None:
            return description
    if descriptions:
        return descriptions[0]
    description = ET.SubElement(rdf, DESCRIPTION, {f"{{{NS_RDF}}}about": ""})
    description.text, description.tail = "\n  ", "\n"
    return description


def _bag(description: ET.Element, tag: str) -> ET.Element:
    """The bag (container) of property `tag` in `description`, created when missing."""
    prop = description.find(tag)
    if prop is None:
        prop = _append(description, tag, "   ")
        container = _append(prop, _BAG, "    ")
        return container
    container = next(iter(prop), None)
    return container if container is not None else _append(prop, _BAG, "    ")


def _append(parent: ET.Element, tag: str, indent: str) -> ET.Element:
    """A new last child; with siblings it takes their indentation, else `indent`."""
    child = ET.SubElement(parent, tag)
    if len(parent) == 1:
        closing = parent.text if (parent.text or "x").strip() == "" else "\n" + indent[:-1]
        parent.text, child.tail = "\n" + indent, closing
    else:
        previous = parent[-2]
        child.tail = previous.tail
        previous.tail = parent.text if (parent.text or "x").strip() == "" else "\n" + indent
    return child


def _declare(packet: Packet, description: ET.Element, uris: list[str]) -> None:
    """Declare zsclip's namespaces on `description` unless it or the elements above it do, so
    that they show as xmlns:dc=... on the rdf:Description, as XMP writers do."""
    rdf = rdf_of(packet.root)
    above = [packet.root, rdf, description]
    bound = {
        uri: prefix for element in above for prefix, uri in packet.declarations.get(element, [])
    }
    taken = {prefix for element in above for prefix, _ in packet.declarations.get(element, [])}
    mine = packet.declarations.setdefault(description, [])
    for uri in uris:
        if uri in bound:
            continue
        prefix, number = PREFIXES[uri], 1
        while prefix in taken:
            number += 1
            prefix = f"{PREFIXES[uri]}{number}"
        mine.append((prefix, uri))
        taken.add(prefix)


def set_keywords(packet: Packet, labels: list[str]) -> None:
    """Replace zsclip's keywords in `packet` by `labels` (none: just remove them)."""
    _remove_own(packet)
    labels = list(dict.fromkeys(_clean(label) for label in labels))
    if not labels:
        return
    description = _target_description(packet)
    _declare(packet, description, [NS_DC, NS_LR, NS_ZSCLIP])
    subject = description.find(_SUBJECT)
    present = {_text(li) for li in _bag_items(subject)} if subject is not None else set()
    added = [label for label in labels if label not in present]
    for label in added:
        _append(_bag(description, _SUBJECT), _LI, "     ").text = label
    for label in labels:
        _append(_bag(description, _HIERARCHICAL), _LI, "     ").text = hierarchical_name(label)
    for label in added:
        _append(_bag(description, _OWN), _LI, "     ").text = label


def is_empty(packet: Packet) -> bool:
    """Nothing left but the skeleton: descriptions without properties or values."""
    rdf = rdf_of(packet.root)
    if packet.root is not rdf and len(packet.root) != 1:
        return False
    for description in rdf:
        if description.tag != DESCRIPTION or len(description) or (description.text or "").strip():
            return False
        if any(name != f"{{{NS_RDF}}}about" for name in description.attrib):
            return False
    return True


# ------------------------------------------------------------------------------ the jobs


def _write(path: str, packet: Packet) -> None:
    from zsclip.atomic import atomic_write_bytes

    try:
        atomic_write_bytes(path, serialize(packet))
    except OSError as err:
        raise XmpError(f"cannot write {path}: {err.strerror or err}") from None
    except Exception as err:  # zsclip.atomic's UserError: a folder, a socket, ... in the way
        raise XmpError(f"cannot write {path}: {err}") from None


def tag_image(image: str, labels: list[str]) -> list[str]:
    """Write `labels` as zsclip's keywords into the sidecars of `image` (see the module docstring),
    replacing zsclip's earlier ones; no sidecar is created for no labels. Every sidecar is read
    and checked before any is written. Returns the sidecars written."""
    if not os.path.isfile(image):
        raise XmpError(f"{image}: no such image file; no sidecar written")
    existing = sidecars_of(image)
    if not existing and not labels:
        return []
    packets = {path: read_packet(path) for path in existing} or {_candidates(image)[0]: None}
    written = []
    for path, packet in packets.items():
        before = None if packet is None else serialize(packet)
        packet = packet or new_packet()
        set_keywords(packet, labels)
        if serialize(packet) != before:
            _write(path, packet)
            written.append(path)
    return written


def read_tags(image: str) -> dict[str, list[str]]:
    """zsclip's keywords in each sidecar of `image` (sidecar path -> labels)."""
    return {path: zsclip_keywords(read_packet(path)) for path in sidecars_of(image)}


def remove_tags(image: str) -> list[str]:
    """Take zsclip's keywords out of the sidecars of `image`; a sidecar left with nothing at all
    in it is removed. Returns the sidecars changed."""
    changed = []
    for path in sidecars_of(image):
        packet = read_packet(path)
        if not _remove_own(packet):
            continue
        if is_empty(packet):
            try:
                os.unlink(path)
            except OSError as err:
                raise XmpError(f"cannot remove {path}: {err.strerror or err}") from None
        else:
            _write(path, packet)
        changed.append(path)
    return changed
