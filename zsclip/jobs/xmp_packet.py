"""XMP packets, read and written safely: the parsing and serialising half of zsclip.jobs.xmp.

`read_packet` parses a sidecar with expat, refusing a DOCTYPE or entity declaration before anything
is expanded (no entity bombs, no external entities), files over MAX_SIDECAR_BYTES, nesting deeper than
MAX_DEPTH and anything that is not an XMP packet (x:xmpmeta holding rdf:RDF, or rdf:RDF alone). The
tree keeps comments, processing instructions and where each namespace was declared with which prefix,
so `serialize` writes back what other programs wrote as they wrote it, with only zsclip's changes.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Callable

NS_X = "adobe:ns:meta/"
NS_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
NS_DC = "http://purl.org/dc/elements/1.1/"
NS_LR = "http://ns.adobe.com/lightroom/1.0/"
NS_ZSCLIP = "urn:x-zsclip:xmp:1.0/"
PREFIXES = {NS_X: "x", NS_RDF: "rdf", NS_DC: "dc", NS_LR: "lr", NS_ZSCLIP: "zsclip"}

MAX_SIDECAR_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 64
RDF = f"{{{NS_RDF}}}RDF"
DESCRIPTION = f"{{{NS_RDF}}}Description"


class XmpError(Exception):
    """A sidecar that cannot be read or written; the message is one line and names the file."""


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
    if root.tag == RDF:
        return
    if root.tag in (f"{{{NS_X}}}xmpmeta", f"{{{NS_X}}}xapmeta") and root.find(RDF) is not None:
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
    rdf = ET.SubElement(root, RDF)
    rdf.text, rdf.tail = "\n  ", "\n"
    description = ET.SubElement(rdf, DESCRIPTION, {f"{{{NS_RDF}}}about": ""})
    description.text, description.tail = "\n  ", "\n "
    return Packet(root, {root: [("x", NS_X)], rdf: [("rdf", NS_RDF)]})


def rdf_of(root: ET.Element) -> ET.Element:
    """The rdf:RDF element of a packet's tree (the root itself, or x:xmpmeta's child)."""
    return root if root.tag == RDF else root.find(RDF)  # type: ignore[return-value]


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
