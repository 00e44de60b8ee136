"""The key image: a labelled Secondary Capture of the most informative input slice/radiograph.

Labels are drawn only where the model localised a finding on that very source image (its evidence
point mapped to source pixels); levels the model did not localise on it are listed in a legend,
never placed at a guessed position.  "NOT FOR DIAGNOSTIC USE" is burned in on every key image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.pixels.processing import convert_color_space

from inference.findings import ImagePlane, InputImage, LevelFinding, SpineFindings
from sr_templates.codes import LONGITUDINAL_PLANES, SpineCodes
from sr_templates.evidence import ResolvedEvidence, patient_and_study
from sr_templates.text import NOT_FOR_DIAGNOSTIC_USE, finding_label

__all__ = ["KeyImageChoice", "SpineKeyImage", "choose_key_image", "render_key_image"]

_MIN_SIZE = 512
_MAX_SCALE = 4


@dataclass(frozen=True)
class KeyImageChoice:
    """Which source image becomes the key image.

    Attributes
    ----------
    sop_instance_uid
        Source instance.
    frame_number
        1-based source frame for multi-frame sources, else ``None``.
    input_index
        Index of the model input image it was chosen through, or ``None`` (fallback choice).
    """

    sop_instance_uid: str
    frame_number: int | None
    input_index: int | None


def choose_key_image(findings: SpineFindings, resolved: Sequence[Sequence[ResolvedEvidence]]) -> KeyImageChoice | None:
    """Pick the single-source input image with the most localised evidence (longitudinal planes first).

    Falls back to the first single-source input image, then ``None``.
    """
    counts: dict[int, int] = {}
    for evs in resolved:
        for ev in evs:
            if ev.point is not None:
                counts[ev.image_index] = counts.get(ev.image_index, 0) + 1
    candidates: list[InputImage] = [im for im in findings.images if im.single_source]
    if not candidates:
        return None

    def rank(im: InputImage) -> tuple[int, int, int, int]:
        return (
            -counts.get(im.index, 0),
            0 if im.plane in LONGITUDINAL_PLANES else 1,
            0 if im.plane in (ImagePlane.SAGITTAL, ImagePlane.PROJECTION) else 1,
            im.index,
        )

    best = min(candidates, key=rank)
    return KeyImageChoice(best.sop_instance_uids[0], best.frame_number, best.index)


def _to_uint8_rgb(ds: pydicom.Dataset, frame_number: int | None) -> npt.NDArray[np.uint8]:
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[(frame_number or 1) - 1]
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if str(ds.get("PhotometricInterpretation", "RGB")) != "RGB":
            arr = convert_color_space(arr, str(ds.PhotometricInterpretation), "RGB")
        return np.ascontiguousarray(arr.astype(np.uint8))
    img = arr.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    center = ds.get("WindowCenter")
    width = ds.get("WindowWidth")
    if center is not None and width is not None:
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        lo, hi = c - w / 2.0, c + w / 2.0
    else:
        lo, hi = (float(v) for v in np.percentile(img, [1.0, 99.0]))
    if hi <= lo:
        hi = lo + 1.0
    grey = np.clip((img - lo) / (hi - lo), 0.0, 1.0) * 255.0
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        grey = 255.0 - grey
    g8 = np.round(grey).astype(np.uint8)
    return np.ascontiguousarray(np.stack([g8, g8, g8], axis=-1))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def render_key_image(
    pixels: npt.NDArray[np.uint8],
    labels: Sequence[tuple[float, float, str]],
    legend: Sequence[str],
    *,
    demo: bool,
) -> tuple[npt.NDArray[np.uint8], int]:
    """Upscale ``pixels`` (RGB) and burn in labels, legend and the not-for-diagnostic-use banner.

    Parameters
    ----------
    pixels
        Source image, rows x columns x 3, uint8.
    labels
        (column, row, text) in source pixel coordinates.
    legend
        Lines listed at the bottom (findings not localised on this image).
    demo
        Add the demo-model warning.

    Returns
    -------
    tuple
        The labelled image and the integer upscale factor applied.
    """
    rows, cols = pixels.shape[:2]
    scale = max(1, min(_MAX_SCALE, -(-_MIN_SIZE // max(1, min(rows, cols)))))
    image = Image.fromarray(pixels, mode="RGB")
    if scale > 1:
        image = image.resize((cols * scale, rows * scale), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    w, h = image.size
    size = max(12, w // 40)
    font = _font(size)
    yellow, black, red = (255, 230, 0), (0, 0, 0), (255, 60, 60)
    for col, row, text in labels:
        x, y = col * scale, row * scale
        r = max(3, size // 3)
        draw.ellipse((x - r, y - r, x + r, y + r), outline=yellow, width=2)
        draw.text((x + 2 * r, y - size // 2), text, fill=yellow, font=font, stroke_width=2, stroke_fill=black)
    banner = NOT_FOR_DIAGNOSTIC_USE + (" - DEMO MODEL, NOT FOR CLINICAL USE" if demo else "")
    draw.text((size // 2, size // 3), banner, fill=red, font=font, stroke_width=2, stroke_fill=black)
    y = h - (len(legend) + 1) * (size + 4)
    if legend:
        draw.text(
            (size // 2, y),
            "Not localised on this image:",
            fill=yellow,
            font=font,
            stroke_width=2,
            stroke_fill=black,
        )
    for i, line in enumerate(legend):
        draw.text(
            (size // 2, y + (i + 1) * (size + 4)),
            line,
            fill=yellow,
            font=font,
            stroke_width=2,
            stroke_fill=black,
        )
    return np.asarray(image, dtype=np.uint8).copy(), scale


_ORIENT = (("L", "R"), ("P", "A"), ("H", "F"))


def _direction_label(vec: Sequence[float]) -> str:
    order = sorted(range(3), key=lambda i: -abs(vec[i]))
    out = ""
    for i in order:
        if abs(vec[i]) < 0.3:  # cosine threshold: ignore small obliquity components
            continue
        out += _ORIENT[i][0] if vec[i] > 0 else _ORIENT[i][1]
    return out or "L"


def patient_orientation(ds: pydicom.Dataset) -> tuple[str, str] | None:
    """Patient Orientation (row, column directions) of a source image, from its header."""
    iop = ds.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        v = [float(x) for x in iop]
        return (_direction_label(v[:3]), _direction_label(v[3:]))
    po = ds.get("PatientOrientation")
    if po is not None and len(po) == 2:
        return (str(po[0]), str(po[1]))
    return None


class SpineKeyImage(hd.sc.SCImage):
    """Secondary Capture key image with burned-in level labels (BurnedInAnnotation YES).

    Parameters
    ----------
    source
        The source image dataset (with pixel data).
    frame_number
        1-based frame of a multi-frame source, else ``None``.
    findings
        Findings drawn on it: (finding, resolved evidence) pairs.
    series_instance_uid, series_number, sop_instance_uid, instance_number
        Identity of the new instance.
    manufacturer
        Our manufacturer name.
    demo
        True for the demo model (adds "DEMO MODEL, NOT FOR CLINICAL USE").
    **kwargs
        Passed to :class:`highdicom.sc.SCImage` (series description, software versions, ...).

    Raises
    ------
    TypeError
        ``source`` is not a dataset with pixel data.
    ValueError
        ``frame_number`` is outside the source's frames.
    """

    def __init__(
        self,
        source: pydicom.Dataset,
        frame_number: int | None,
        findings: Sequence[tuple[LevelFinding, Sequence[ResolvedEvidence]]],
        series_instance_uid: str,
        series_number: int,
        sop_instance_uid: str,
        instance_number: int,
        manufacturer: str,
        *,
        demo: bool = False,
        **kwargs: object,
    ) -> None:
        if not isinstance(source, pydicom.Dataset) or "PixelData" not in source:
            raise TypeError("source: expected a pydicom Dataset with pixel data")
        frames = int(source.get("NumberOfFrames", 1) or 1)
        if frame_number is not None and not 1 <= frame_number <= frames:
            raise ValueError(f"frame_number: {frame_number} outside 1..{frames}")
        uid = str(source.SOPInstanceUID)
        labels: list[tuple[float, float, str]] = []
        legend: list[str] = []
        for finding, evs in findings:
            here = [
                ev
                for ev in evs
                if ev.point is not None
                and ev.sop_instance_uids[0] == uid
                and (frames == 1 or ev.frame_number == frame_number)
            ]
            if here and not finding.absent:  # an absent condition is not marked on the image
                for ev in here:
                    assert ev.point is not None
                    labels.append((ev.point[0], ev.point[1], finding.level))
            else:
                legend.append(f"{finding.level}: {finding_label(finding)}")
        rgb = _to_uint8_rgb(source, frame_number)
        pixels, scale = render_key_image(rgb, labels, legend, demo=demo)
        spacing = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
        pixel_spacing = (float(spacing[0]) / scale, float(spacing[1]) / scale) if spacing else None
        orientation = patient_orientation(source)
        super().__init__(
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=manufacturer,
            **patient_and_study(source),
            pixel_spacing=pixel_spacing,
            patient_orientation=orientation or ("P", "F"),
            # names and descriptions may hold any Unicode (the demo notice has an em dash)
            specific_character_set="ISO_IR 192",
            **kwargs,  # type: ignore[arg-type]
        )
        self.BurnedInAnnotation = "YES"
        # General Series Laterality is Type 2C, required for paired body parts without Image
        # Laterality: the spine is unpaired, which Image Laterality "U" states explicitly.
        if "Laterality" in self:
            del self.Laterality
        self.ImageLaterality = "U"
        if source.get("BodyPartExamined"):
            self.BodyPartExamined = source.BodyPartExamined
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = source.SOPClassUID
        item.ReferencedSOPInstanceUID = source.SOPInstanceUID
        if frames > 1 and frame_number is not None:
            item.ReferencedFrameNumber = frame_number
        purpose = hd.sr.CodedConcept.from_code(SpineCodes.SOURCE_IMAGE_FOR_PROCESSING)
        item.PurposeOfReferenceCodeSequence = [purpose]
        self.SourceImageSequence = [item]
        self.DerivationDescription = (
            f"SpineMed key image: source upscaled x{scale}, levels labelled, '{NOT_FOR_DIAGNOSTIC_USE}' burned in"
        )
        if orientation is None:
            # no orientation in the source header: say so rather than claim one
            self.PatientOrientation = []
