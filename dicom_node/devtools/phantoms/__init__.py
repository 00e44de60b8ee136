"""Synthetic spine phantoms written as realistic DICOM Part 10 files (developer tooling: tests, demo, benchmarks).

No real spine DICOM is available offline, so the demo and the test-suite use the
phantoms generated here.  Each generator renders a simple analytic anatomy model,
plants one known finding (the *truth*) and writes the images with headers that
look like real modality output to pydicom, SimpleITK/GDCM and ``dciodvfy``.

Generators
----------
``make_lumbar_mr``
    MR Image Storage: sagittal T2 TSE (series 2), sagittal T1 TSE (series 3) and,
    optionally, axial T2 at the five lumbar disc levels (series 4).  Planted
    finding: posterior disc herniation at L4-L5.
``make_spine_ct``
    CT Image Storage: axial slices covering roughly L1..S1.  Planted finding:
    wedge compression fracture of L1.
``make_scoliosis_radiograph``
    DX (For Presentation) or CR whole-spine radiograph with a thoracic curve of a
    known Cobb angle between T6 and T12.
``make_chest_radiograph``
    A PA chest DX - a non-spine study the node must skip.

Everything (pixels and UIDs) is deterministic in ``seed``.  UIDs are derived with
:func:`pydicom.uid.generate_uid` from the seed, kind, patient ID, the geometry
parameters and the caller's ``study_instance_uid`` (if given), under pydicom's
UID root (``1.2.826.0.1.3680043.8.498.``), but *not* from the
transfer syntax: the same phantom written with two lossless transfer syntaxes is
the same SOP instance, as DICOM intends.

Transfer syntaxes
-----------------
``transfer_syntax_uid`` accepts Explicit VR Little Endian (default), Implicit VR
Little Endian, Deflated Explicit VR Little Endian, RLE Lossless (pylibjpeg-rle,
else pydicom's own encoder), JPEG-LS Lossless (pyjpegls) and JPEG 2000 Lossless
(pylibjpeg-openjpeg), all encoded with ``Dataset.compress``.  JPEG Lossless SV1
(1.2.840.10008.1.2.4.70) is accepted only if pydicom has an encoder for it - it
has none today - otherwise (as for any other UID) a ``ValueError`` naming
``transfer_syntax_uid`` is raised before anything is written.  There is never a
silent fallback.

Coordinates
-----------
MR and CT use the DICOM patient coordinate system (LPS: +x towards the patient's
left, +y posterior, +z head).  The patient is head-first supine.  Projection
radiographs have no patient coordinate system; their ``vertebra_centres`` are
detector-plane millimetres measured from the centre of the top-left pixel:
``(x, y, 0.0)`` with ``x = column * spacing`` (towards the image right, i.e. the
patient's left on AP / the patient's posterior on the lateral view) and
``y = row * spacing`` (towards the patient's feet), so ``column = x / spacing``,
``row = y / spacing`` with ``spacing`` the (isotropic) ``ImagerPixelSpacing``.

Validation notes (``dciodvfy``, dicom3tools)
--------------------------------------------
Every kind/variant (MR sagittal and axial, CT, DX AP/LL in MONOCHROME1/2, CR,
chest DX; uncompressed and RLE / JPEG-LS / JPEG 2000 encoded) validates with no
*Error* and no *Warning* lines.  Things that dciodvfy would otherwise flag and
that are deliberately handled: ProcedureCodeSequence is omitted (an empty
type-3 sequence is an error), CT carries CTDIPhantomTypeCodeSequence next to
CTDIvol, DX has PositionerType (type 2) and a ViewCodeSequence matching
ViewPosition (CR must not have one: not in the CR IOD), MR Image Type value 3 is
the defined term OTHER.  The installed dciodvfy cannot parse *Deflated* Explicit
VR Little Endian at all (it fails on pydicom's own deflated test file too), so
deflated output is verified with pydicom and GDCM/SimpleITK instead.
"""

from dicom_node.devtools.phantoms.common import SUPPORTED_TRANSFER_SYNTAXES, SyntheticStudy
from dicom_node.devtools.phantoms.ct import make_spine_ct
from dicom_node.devtools.phantoms.mr import make_lumbar_mr
from dicom_node.devtools.phantoms.radiograph import make_chest_radiograph, make_scoliosis_radiograph
from dicom_node.devtools.phantoms.studies import make_study

__all__ = [
    "SUPPORTED_TRANSFER_SYNTAXES",
    "SyntheticStudy",
    "make_chest_radiograph",
    "make_lumbar_mr",
    "make_scoliosis_radiograph",
    "make_spine_ct",
    "make_study",
]
