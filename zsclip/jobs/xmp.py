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

Sidecars are hostile input: a DOCTYPE or entity declaration is refused before anything is expanded
(so no entity bombs, no external entities), as are files over MAX_SIDECAR_BYTES, nesting deeper than
MAX_DEPTH and anything that is not an XMP packet. A refused sidecar is left untouched.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Callable

NS_X = "adobe:ns:meta/"
NS_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
NS_DC = "http://purl.org/dc/elements/1.1/"
NS_LR = "http://ns.adobe.com/lightroom/1.0/"
NS_ZSCLIP = "urn:x-zsclip:xmp:1.0/"
PREFIXES = {NS_X: "x", NS_RDF: "rdf", NS_DC: "dc", NS_LR: "lr", NS_ZSCLIP: "zsclip"}
HIERARCHY_ROOT = "zsclip"  # lr:hierarchicalSubject entries are "zsclip|LABEL"

MAX_SIDECAR_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 64
_RDF = f"{{{NS_RDF}}}RDF"
_DESCRIPTION = f"{{{NS_RDF}}}Description"
_LI = f"{{{NS_RDF}}}li"
_BAG = f"{{{NS_RDF}}}Bag"
_SUBJECT = f"{{{NS_DC}}}subject"
_HIERARCHICAL = f"{{{NS_LR}}}hierarchicalSubject"
_OWN = f"{{{NS_ZSCLIP}}}Keywords"
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


class XmpError(Exception):
    """A sidecar that cannot be read or written; the message is one line and names the file."""


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


# ------------------------------------------------------------------------------ reading safely


@dataclass
class Packet:
    """A parsed sidecar: the tree, the namespace declarations each element made (so prefixes come
    back as they were), and how the file began."""

    root: ET.Element
    declarations: dict[ET.Element, list[tuple[str, str]]] = field(default_factory=dict)
    xpacket: bool = True  # wrapped in <?xpacket?> (else: an <?xml?> declaration)


def _refuse(what: str) -> Callable:
    def handler(*args: object) -> None:
        raise XmpError(f"{what} are not allowed in XMP (refused before expanding anything)")

    return handler


def _qualified(name: str) -> str:
    return "{" + name if "}" in name else name  # expat gives "uri}local"


def parse_packet(data: bytes, name: str) -> Packet:
    """An XMP packet from `data`, or XmpError naming `name`. No DTD, no entity is ever processed."""
    import xml.parsers.expat as expat

    builder = ET.TreeBuilder(insert_comments=True, insert_pis=True)
    parser = expat.ParserCreate(namespace_separator="}")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    pending: list[tuple[str, str]] = []
    packet = Packet(ET.Element("placeholder"), xpacket=False)
    depth = [0]

    def start(tag: str, attributes: dict[str, str]) -> None:
        depth[0] += 1
        if depth[0] > MAX_DEPTH:
            raise XmpError(f"elements nested deeper than {MAX_DEPTH}")
        element = builder.start(_qualified(tag), {_qualified(k): v for k, v in attributes.items()})
        packet.declarations[element] = pending[:]
        pending.clear()

    def end(tag: str) -> None:
        depth[0] -= 1
        builder.end(_qualified(tag))

    def instruction(target: str, text: str) -> None:
        if target == "xpacket":
            packet.xpacket = True
        elif depth[0]:
            builder.pi(target, text)

    parser.StartElementHandler, parser.EndElementHandler = start, end
    parser.CharacterDataHandler = builder.data
    parser.CommentHandler = lambda text: builder.comment(text) if depth[0] else None
    parser.ProcessingInstructionHandler = instruction
    parser.StartNamespaceDeclHandler = lambda prefix, uri: pending.append((prefix or "", uri))
    parser.StartDoctypeDeclHandler = _refuse("DOCTYPE declarations")
    parser.EntityDeclHandler = _refuse("entity declarations")
    parser.UnparsedEntityDeclHandler = _refuse("entity declarations")
    parser.ExternalEntityRefHandler = _refuse("external entities")
    try:
        parser.Parse(data, True)
        packet.root = builder.close()
    except XmpError as err:
        raise XmpError(f"{name}: {err}; left untouched") from None
    except (expat.ExpatError, ValueError) as err:  # ValueError: a name or text expat let through
        raise XmpError(f"{name}: not valid XML ({err}); left untouched") from None
    _check_shape(packet.root, name)
    return packet


def _check_shape(root: ET.Element, name: str) -> None:
    if root.tag == _RDF:
        return
    if root.tag in (f"{{{NS_X}}}xmpmeta", f"{{{NS_X}}}xapmeta") and root.find(_RDF) is not None:
        return
    raise XmpError(
        f"{name}: not an XMP sidecar (its root element is {root.tag!r}, not x:xmpmeta with "
        "rdf:RDF); left untouched"
    )


def read_packet(path: str) -> Packet:
    """The sidecar at `path` (a link is followed), read with a size limit and parsed safely."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as err:
        raise XmpError(f"cannot read {path}: {err.strerror or err}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device named .xmp
            raise XmpError(f"{path}: not a regular file; left untouched")
        try:
            data = handle.read(MAX_SIDECAR_BYTES + 1)
        except OSError as err:
            raise XmpError(f"cannot read {path}: {err.strerror or err}") from None
    if len(data) > MAX_SIDECAR_BYTES:
        raise XmpError(f"{path}: larger than {MAX_SIDECAR_BYTES} bytes; left untouched")
    return parse_packet(data, path)


def new_packet() -> Packet:
    root = ET.Element(f"{{{NS_X}}}xmpmeta")
    root.text = "\n "
    rdf = ET.SubElement(root, _RDF)
    rdf.text, rdf.tail = "\n  ", "\n"
    description = ET.SubElement(rdf, _DESCRIPTION, {f"{{{NS_RDF}}}about": ""})
    description.text, description.tail = "\n  ", "\n "
    return Packet(root, {root: [("x", NS_X)], rdf: [("rdf", NS_RDF)]})


# ------------------------------------------------------------------------------ keywords


def _rdf_of(root: ET.Element) -> ET.Element:
    return root if root.tag == _RDF else root.find(_RDF)  # type: ignore[return-value]


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
    for description in _rdf_of(packet.root).iter(_DESCRIPTION):
        for prop in description.findall(_HIERARCHICAL):
            found += [
                _text(li)[len(prefix) :] for li in _bag_items(prop) if _text(li).startswith(prefix)
            ]
    return found


def _remove_own(packet: Packet) -> bool:
    """Take out everything zsclip wrote before; True when something was removed."""
    rdf = _rdf_of(packet.root)
    added: set[str] = set()
    removed = False
    for description in rdf.iter(_DESCRIPTION):
        for own in description.findall(_OWN):
            added.update(_text(li) for li in _bag_items(own))
            _drop(description, own)
            removed = True
    for description in rdf.iter(_DESCRIPTION):
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
    rdf = _rdf_of(packet.root)
    descriptions = [d for d in rdf if d.tag == _DESCRIPTION]
    for description in descriptions:
        if description.find(_SUBJECT) is not None:
            return description
    if descriptions:
        return descriptions[0]
    description = ET.SubElement(rdf, _DESCRIPTION, {f"{{{NS_RDF}}}about": ""})
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
    rdf = _rdf_of(packet.root)
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
    rdf = _rdf_of(packet.root)
    if packet.root is not rdf and len(packet.root) != 1:
        return False
    for description in rdf:
        if description.tag != _DESCRIPTION or len(description) or (description.text or "").strip():
            return False
        if any(name != f"{{{NS_RDF}}}about" for name in description.attrib):
            return False
    return True


# ------------------------------------------------------------------------------ writing


def _escape(text: str, attribute: bool = False) -> str:
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if attribute:
        text = text.replace('"', "&quot;").replace("\n", "&#10;").replace("\r", "&#13;")
        text = text.replace("\t", "&#9;")
    return text.replace("\r", "&#13;")


class _Writer:
    """Serialises a Packet, declaring each namespace where the original did (new ones where first
    needed) with the original prefixes."""

    def __init__(self, packet: Packet) -> None:
        self.packet, self.out = packet, []  # type: ignore[var-annotated]

    def element(self, element: ET.Element, scope: dict[str, str]) -> None:
        if element.tag is ET.Comment:
            self.out.append(f"<!--{element.text or ''}-->")
        elif element.tag is ET.ProcessingInstruction:
            self.out.append(f"<?{element.text or ''}?>")
        else:
            self._open_close(element, scope)
        self.out.append(_escape(element.tail or ""))

    def _open_close(self, element: ET.Element, scope: dict[str, str]) -> None:
        scope = dict(scope)  # prefix -> uri in effect here
        declarations = list(self.packet.declarations.get(element, []))
        for prefix, uri in declarations:
            scope[prefix] = uri
        name = self._name(element.tag, scope, declarations, attribute=False)
        attributes = [
            (self._name(key, scope, declarations, attribute=True), value)
            for key, value in element.attrib.items()
        ]
        parts = [name]
        for prefix, uri in declarations:
            parts.append(f'xmlns{":" + prefix if prefix else ""}="{_escape(uri, True)}"')
        parts += [f'{key}="{_escape(value, True)}"' for key, value in attributes]
        self.out.append("<" + " ".join(parts))
        if not len(element) and not element.text:
            self.out.append("/>")
            return
        self.out.append(">" + _escape(element.text or ""))
        for child in element:
            self.element(child, scope)
        self.out.append(f"</{name}>")

    @staticmethod
    def _name(
        tag: str, scope: dict[str, str], declarations: list[tuple[str, str]], attribute: bool
    ) -> str:
        """`prefix:local` for `{uri}local`, declaring a prefix here when none is in scope (an
        attribute needs a real prefix: the default namespace does not apply to attributes)."""
        if not tag.startswith("{"):
            return tag
        uri, local = tag[1:].split("}", 1)
        for prefix, bound in scope.items():
            if bound == uri and (prefix or not attribute):
                return f"{prefix}:{local}" if prefix else local
        base = PREFIXES.get(uri, "ns")
        prefix, number = base, 1
        while prefix in scope:
            number += 1
            prefix = f"{base}{number}"
        scope[prefix] = uri
        declarations.append((prefix, uri))
        return f"{prefix}:{local}"


def serialize(packet: Packet) -> bytes:
    writer = _Writer(packet)
    writer.element(packet.root, {"xml": "http://www.w3.org/XML/1998/namespace"})
    body = "".join(writer.out).rstrip("\n")
    if packet.xpacket:
        head = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        return (head + body + '\n<?xpacket end="w"?>\n').encode("utf-8")
    return ('<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n").encode("utf-8")


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
