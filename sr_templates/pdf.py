"""The report as an Encapsulated PDF, for PACS and RIS that display a PDF where they render no SR.

:func:`render_report_pdf` lays out the narrative report (the same six sections and per-level lines as the
narrative SR, from the same inputs) and the labelled key image on A4 pages with fpdf2;
:class:`SpineEncapsulatedPDF` wraps the bytes in an Encapsulated PDF object (PS3.3 A.45.1) in the study,
in a series of its own, referencing the SRs it renders.  Same inputs, same bytes: the PDF's dates are the
build time and its file identifier is derived from its content.
"""

from __future__ import annotations

import datetime
import io
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from fpdf import FPDF
from PIL import Image
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from sr_templates.evidence import patient_and_study

__all__ = [
    "ENCAPSULATED_PDF",
    "SpineEncapsulatedPDF",
    "coded_narrative_sections",
    "narrative_sections",
    "render_report_pdf",
]

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
DEMO_BANNER = "DEMO MODEL OUTPUT - NOT FOR CLINICAL USE"
_FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu"))


def _unicode_font() -> tuple[Path, Path] | None:
    """DejaVu Sans regular and bold (Debian ``fonts-dejavu-core``), else None."""
    for folder in _FONT_DIRS:
        regular, bold = folder / "DejaVuSans.ttf", folder / "DejaVuSans-Bold.ttf"
        if regular.is_file() and bold.is_file():
            return regular, bold
    return None


class _ReportPDF(FPDF):
    def __init__(self, footer_text: str, banner: str | None, family: str) -> None:
        super().__init__(orientation="portrait", unit="mm", format="A4")
        self.footer_text = footer_text
        self.banner = banner
        self.family = family

    def header(self) -> None:
        if self.banner:
            self.set_font(self.family, "B", 11)
            self.set_text_color(200, 0, 0)
            self.cell(0, 7, self.banner, align="C", new_x="LMARGIN", new_y="NEXT")
            self.set_text_color(0, 0, 0)
            self.ln(2)

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font(self.family, "", 8)
        self.set_text_color(90, 90, 90)
        self.cell(0, 5, f"{self.footer_text}    page {self.page_no()} of {{nb}}", align="C")
        self.set_text_color(0, 0, 0)


def render_report_pdf(
    *,
    title: str,
    identification: Sequence[tuple[str, str]],
    sections: Sequence[tuple[str, Sequence[str]]],
    key_image: pydicom.Dataset | None,
    demo: bool,
    footer: str,
    created_at: datetime.datetime,
) -> bytes:
    """Lay out the report on A4 pages.

    Parameters
    ----------
    title
        Document title (first line, bold).
    identification
        ``(label, value)`` lines under the title: patient, patient ID, birth date, accession, study
        date — a printed or exported report must name whom and which study it is about.
    sections
        ``(heading, paragraphs)`` in report order: :func:`narrative_sections` of the narrative SR, so the
        PDF says what the SR says (the six sections; the per-level lines are in Findings).
    key_image
        The labelled key image (RGB Secondary Capture), placed after the sections; or None.
    demo
        Print the demo model's warning at the top of every page.
    footer
        Text at the bottom of every page (next to the page number).
    created_at
        Creation date written into the PDF (the build time: rebuilds are byte-identical).

    Returns
    -------
    bytes
        The PDF document.

    Raises
    ------
    TypeError
        An argument has the wrong type.

    Notes
    -----
    Text is set in DejaVu Sans (every script the model may write in Latin, Greek, Cyrillic; symbols
    such as "≥"); without the font (Debian ``fonts-dejavu-core``) the PDF core font is used and
    characters outside Latin-1 are replaced by "?".
    """
    if not isinstance(title, str) or not isinstance(footer, str):
        raise TypeError("title, footer: expected str")
    if any(not (isinstance(h, str) and isinstance(t, str)) for h, t in identification):
        raise TypeError("identification: expected (label, value) pairs of str")
    if any(not isinstance(h, str) or isinstance(ps, str) or any(not isinstance(p, str) for p in ps)
           for h, ps in sections):
        raise TypeError("sections: expected (heading, paragraphs) with str heading and a sequence of str")
    if key_image is not None and not isinstance(key_image, pydicom.Dataset):
        raise TypeError(f"key_image: expected a pydicom Dataset or None, got {type(key_image).__name__}")
    if not isinstance(created_at, datetime.datetime):
        raise TypeError(f"created_at: expected datetime, got {type(created_at).__name__}")

    font = _unicode_font()
    family = "DejaVu" if font is not None else "helvetica"

    def txt(value: str) -> str:
        return value if font is not None else value.encode("latin-1", "replace").decode("latin-1")

    pdf = _ReportPDF(txt(footer), DEMO_BANNER if demo else None, family)
    if font is not None:
        pdf.add_font("DejaVu", "", str(font[0]))
        pdf.add_font("DejaVu", "B", str(font[1]))
    stamp = created_at if created_at.tzinfo is not None else created_at.replace(tzinfo=datetime.UTC)
    pdf.set_creation_date(stamp)
    pdf.set_title(txt(title))
    pdf.set_creator("spinemed-node")
    pdf.set_producer("spinemed-node (fpdf2)")
    pdf.set_auto_page_break(auto=True, margin=16)
    pdf.add_page()
    pdf.set_font(family, "B", 15)
    pdf.multi_cell(0, 8, txt(title), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(family, "", 10)
    for label, value in identification:
        pdf.multi_cell(0, 5.5, txt(f"{label}: {value}"), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(3)
    for heading, paragraphs in sections:
        pdf.set_font(family, "B", 12)
        pdf.multi_cell(0, 7, txt(heading), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font(family, "", 10)
        for text in paragraphs:
            pdf.multi_cell(0, 5.5, txt(text), new_x="LMARGIN", new_y="NEXT")
        pdf.ln(2)
    if key_image is not None:
        rgb = np.asarray(key_image.pixel_array, dtype=np.uint8)
        picture = Image.fromarray(rgb if rgb.ndim == 3 else np.stack([rgb] * 3, axis=-1), mode="RGB")
        width = pdf.epw
        height = width * picture.height / picture.width
        if pdf.get_y() + height + 12 > pdf.h - pdf.b_margin:
            pdf.add_page()
        pdf.set_font(family, "B", 12)
        pdf.cell(0, 7, "Key image", new_x="LMARGIN", new_y="NEXT")
        buf = io.BytesIO()
        picture.save(buf, format="PNG", optimize=False)
        pdf.image(buf, w=width, h=height)
        pdf.set_font(family, "", 9)
        caption = str(key_image.get("DerivationDescription", "")) or "Labelled key image"
        pdf.multi_cell(0, 5, txt(caption), new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def narrative_sections(narrative_sr: pydicom.Dataset) -> list[tuple[str, list[str]]]:
    """``(heading, paragraphs)`` of each section container of a narrative SR, in document order.

    Raises
    ------
    TypeError
        ``narrative_sr`` is not a pydicom Dataset.
    """
    return [(code.meaning, texts) for code, texts in coded_narrative_sections(narrative_sr)]


def coded_narrative_sections(narrative_sr: pydicom.Dataset) -> list[tuple[Code, list[str]]]:
    """``(heading concept, paragraphs)`` of each section container holding text, in document order.

    Raises
    ------
    TypeError
        ``narrative_sr`` is not a pydicom Dataset.
    """
    if not isinstance(narrative_sr, pydicom.Dataset):
        raise TypeError(f"narrative_sr: expected a pydicom Dataset, got {type(narrative_sr).__name__}")
    out: list[tuple[Code, list[str]]] = []
    for item in narrative_sr.get("ContentSequence", []):
        if item.ValueType != "CONTAINER":
            continue
        texts = [str(c.TextValue) for c in item.get("ContentSequence", []) if c.ValueType == "TEXT"]
        if texts:
            c = item.ConceptNameCodeSequence[0]
            out.append((Code(str(c.CodeValue), str(c.CodingSchemeDesignator), str(c.CodeMeaning)), texts))
    return out


class SpineEncapsulatedPDF(hd.base.SOPClass):
    """Encapsulated PDF of the SpineMed report (PS3.3 A.45.1), in the study it describes.

    Parameters
    ----------
    evidence
        Source images of the study (patient and study attributes are copied from the first).
    pdf
        The PDF document (from :func:`render_report_pdf`).
    referenced_srs
        The SRs the PDF renders (Referenced Instance Sequence: the narrative and measurement reports).
    series_instance_uid, series_number, sop_instance_uid, instance_number
        Identity of the object (its own series: one modality per series).
    manufacturer, manufacturer_model_name, software_versions
        The node.
    document_title
        Document Title (0042,0010).
    content_datetime
        Content and acquisition date and time.
    series_description
        Series Description.
    institution_name, institutional_department_name
        Where the node runs.

    Raises
    ------
    TypeError
        An argument has the wrong type.
    ValueError
        ``pdf`` is not a PDF, ``evidence`` is empty or spans studies, or a referenced SR is of
        another study.
    """

    def __init__(
        self,
        evidence: Sequence[pydicom.Dataset],
        pdf: bytes,
        referenced_srs: Sequence[pydicom.Dataset],
        series_instance_uid: str,
        series_number: int,
        sop_instance_uid: str,
        instance_number: int,
        manufacturer: str,
        manufacturer_model_name: str,
        software_versions: str,
        document_title: str,
        content_datetime: datetime.datetime,
        series_description: str,
        institution_name: str | None = None,
        institutional_department_name: str | None = None,
    ) -> None:
        if isinstance(evidence, pydicom.Dataset) or not isinstance(evidence, Sequence) or not evidence:
            raise ValueError("evidence: give the study's source images (at least one)")
        if any(not isinstance(ds, pydicom.Dataset) for ds in evidence):
            raise TypeError("evidence: expected pydicom Datasets")
        study_uids = {str(ds.StudyInstanceUID) for ds in evidence}
        if len(study_uids) != 1:
            raise ValueError("evidence: the source images span several studies")
        if not isinstance(pdf, bytes):
            raise TypeError(f"pdf: expected bytes, got {type(pdf).__name__}")
        if not pdf.startswith(b"%PDF-"):
            raise ValueError("pdf: not a PDF document")
        for i, sr in enumerate(referenced_srs):
            if not isinstance(sr, pydicom.Dataset):
                raise TypeError(f"referenced_srs: item {i} is a {type(sr).__name__}, not a pydicom Dataset")
            if str(sr.StudyInstanceUID) not in study_uids:
                raise ValueError(f"referenced_srs: item {i} belongs to another study")
        if not isinstance(document_title, str) or not document_title.strip():
            raise TypeError("document_title: expected a non-empty str")
        if not isinstance(content_datetime, datetime.datetime):
            raise TypeError(f"content_datetime: expected datetime, got {type(content_datetime).__name__}")
        src = evidence[0]
        super().__init__(
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=ENCAPSULATED_PDF,
            instance_number=instance_number,
            modality="DOC",
            manufacturer=manufacturer,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            **patient_and_study(src),
            series_description=series_description,
            manufacturer_model_name=manufacturer_model_name,
            software_versions=software_versions,
            institution_name=institution_name,
            institutional_department_name=institutional_department_name,
            content_date=content_datetime.date(),
            content_time=content_datetime.time(),
            specific_character_set="ISO_IR 192",
        )
        # Encapsulated Document module (PS3.3 C.24.2) and SC Equipment (C.8.6.1)
        self.InstanceNumber = instance_number
        self.ConversionType = "WSD"  # workstation: rendered by the node
        self.AcquisitionDateTime = content_datetime.strftime("%Y%m%d%H%M%S.%f")
        self.BurnedInAnnotation = "YES"  # the PDF names the patient and the study (render_report_pdf)
        self.DocumentTitle = document_title[:64]
        self.ConceptNameCodeSequence = [hd.sr.CodedConcept.from_code(codes.LN.DiagnosticImagingReport)]
        self.MIMETypeOfEncapsulatedDocument = "application/pdf"
        self.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
        self.EncapsulatedDocumentLength = len(pdf)
        # Source Instance Sequence (C.24.2): the SRs this document was rendered from
        sources: list[pydicom.Dataset] = []
        for sr in referenced_srs:
            item = pydicom.Dataset()
            item.ReferencedSOPClassUID = sr.SOPClassUID
            item.ReferencedSOPInstanceUID = sr.SOPInstanceUID
            sources.append(item)
        if sources:
            self.SourceInstanceSequence = sources
