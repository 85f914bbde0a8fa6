"""Per-study inference and DICOM results of ``medpipe score``.

For a **segmenter** the class map is predicted on the reference series' ingest grid, with the TTA and
the small-component removal the package records (``inference`` in ``model.json``)
(:meth:`SegmentationModel.segment`), then sampled at every source frame's pixel centres in world space
(:func:`medpipe.dicom.frames.sample_frames`, nearest neighbour), so the DICOM SEG lies on the source
series' own frames even when ingest resampled a gantry-tilted or unevenly spaced stack. Outputs:

* ``seg.dcm``: DICOM SEG (BINARY, or LABELMAP on request), one segment per class with its coded
  concepts from the model package, referencing every source instance of the reference series;
* ``sr.dcm``: DICOM SR TID 1500 with each segment's volume in mL (the mask's volume on the ingest
  grid: the number in ``scores.csv``), referencing the SEG's segments and the source series;
* ``--explain``: ``map_pm.dcm``, the foreground probability as a Parametric Map on the source frames,
  and ``overlay_NN_sc.dcm``, RGB Secondary Captures of the key frames (where most is segmented, then where
  the probability is highest);
* ``--nifti``: ``mask.nii.gz`` on the ingest grid;
* ``preview.png``: rendered **from the written SEG read back** over the source slices it references.

For a **detector**: ``sr.dcm``, a DICOM SR TID 1500 with one Planar ROI group per finding reported
(score at or above the package's ``report_threshold``: by default the threshold of 1 false positive
per scan on the validation scans): its centre as a SCOORD3D point in the source series' frame of
reference, its diameter (mm) and score as measurements (:func:`medpipe.dicom.sr.write_findings_sr`;
"Nodule absent" when there is none); ``findings.csv`` (every detection, reported or not: centre,
diameter, score, the source frame nearest to it); and per finding reported a key image
``finding_NN_sc.dcm``: an RGB Secondary Capture of the source frame nearest to the centre, in a lung
window, with a circle of the finding's diameter around it.

For a **classifier**: ``sr.dcm`` with each class's probability and the decision at the model's
threshold (binary) or the most probable class (multi-class); ``--explain``: the Grad-CAM map of the
decided class as Parametric Map + Secondary Captures (the map is resampled from the network's input
grid back to the reference series through the affines MONAI tracks).

Every new UID derives from (model id, source series UID, object type), so a study scored twice with
one model yields the same objects. Series numbers are deterministic: 9000 + a model-dependent offset.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.data.datalist import safe_name
from medpipe.dicom.geometry import slice_normal
from medpipe.errors import MedpipeError
from medpipe.inference.package import ModelPackage, segment_code

#: how many key frames get an RGB Secondary Capture overlay with --explain
SC_FRAMES = 3
#: DCM "Saliency" is H1's default quantity for maps; probability maps say what they are
PROBABILITY = {"scheme": "DCM", "value": "122157", "meaning": "Probability"}
#: a finding code for a classifier class without one in the package
FINDING = {"scheme": "SCT", "value": "404684003", "meaning": "Clinical finding"}
#: window (centre, width HU) of the detector's key images: lung
LUNG_WINDOW = (-600.0, 1500.0)


def study_folder(out: Path, patient_id: str, study_uid: str) -> Path:
    return out / "results" / safe_name(patient_id or "unknown") / hashlib.sha1(study_uid.encode()).hexdigest()[:8]


class ResultWriter:
    """Inference and writing for one scoring run (one model, one output folder); thread-safe writes."""

    def __init__(self, package: ModelPackage, net: Any, out: Path, options: Any,
                 created: dt.datetime | None = None) -> None:
        from medpipe.dicom.output import AlgorithmSpec

        self.package = package
        self.net = net
        self.out = out
        self.options = options
        self.created = created or dt.datetime.now()
        self.algorithm = AlgorithmSpec(name=package.name[:64], version=package.version, source="medpipe",
                                       parameters={"model_sha256": package.id})
        self.series_base = 9000 + (int(package.id[:8], 16) % 90) * 10

    # -- inference --------------------------------------------------------------------------------------

    def infer(self, prep: Any, tta: bool) -> dict[str, Any]:
        if self.package.kind == "detector":
            return {"findings": self.net.detect(prep.data["image"])}
        if self.package.kind == "segmenter":
            seg = self.net.segment(prep.data, prep.grid, tta=tta,
                                   min_component_ml=self.package.inference.get("min_component_ml") or 0)
            return {"mask": seg.mask, "foreground": (1.0 - seg.probabilities[0]).astype(np.float32)
                    if self.options.explain else None}
        return self._classify(prep, tta)

    def _classify(self, prep: Any, tta: bool) -> dict[str, Any]:
        from medpipe.inference.segmentation import probabilities_on_grid

        axes = list(self.package.inference.get("tta_axes") or [0]) if tta else None
        prob = self.net.predict_proba([{"image": prep.data["image"]}], tta_axes=axes, batch_size=1)[0]
        out: dict[str, Any] = {"probabilities": prob, "map": None}
        if self.options.explain:
            from medpipe.models.explain import Explainer

            image = prep.data["image"]
            decided = decision(prob, self.package.outputs)[0]
            explainer = Explainer(self.net.nets[0], self.net.config, ["gradcam"])
            cam = explainer(image[None].to(self.net.device), decided)["gradcam"][0]
            affine = getattr(image, "affine", None)
            if affine is None:
                raise MedpipeError("the classifier's eval transforms lost the image geometry (no affine); "
                                   "the Grad-CAM map cannot be put back on the source series")
            out["map"] = probabilities_on_grid(np.asarray(cam, dtype=np.float32)[None], affine, prep.grid)[0]
        return out

    # -- writing ----------------------------------------------------------------------------------------

    def write(self, prep: Any, pred: dict[str, Any]) -> dict[str, Any]:
        from medpipe.dicom.frames import frame_geometries

        item = prep.item
        folder = study_folder(self.out, prep.job.patient_id, prep.job.study_uid)
        folder.mkdir(parents=True, exist_ok=True)
        datasets, keys = self._sources(prep)
        frames = frame_geometries(datasets)
        row: dict[str, Any] = {
            "patient_id": prep.job.patient_id, "study_uid": prep.job.study_uid, "status": "ok", "reason": "",
            "series_used": ";".join(f"{k}={v}" for k, v in (item.get("series_uids") or {}).items()),
            "reference_series_uid": item.get("reference_series_uid"),
        }
        src = _Sources(datasets, keys, frames)
        if self.package.kind == "detector":
            row.update(self._write_findings(pred, src, folder))
        elif self.package.kind == "segmenter":
            row.update(self._write_segmentation(prep, pred, src, folder))
        else:
            row.update(self._write_classification(prep, pred, src, folder))
        row["results"] = str(folder.relative_to(self.out))
        return row

    def _identity(self, source_series: str, what: str, offset: int, description: str, n: int = 1) -> Any:
        from medpipe.dicom.output import OutputIdentity

        return OutputIdentity.derived("medpipe.score", self.package.id, source_series, what,
                                      series_number=self.series_base + offset, created=self.created,
                                      instance_number=n, series_description=description[:64])

    def _sources(self, prep: Any) -> tuple[list[Any], list[str]]:
        """The reference series' source datasets (headers only) in the reference volume's slice order."""
        import pydicom

        from medpipe.dicom.sources import open_key

        ref = str(prep.item["reference_volume"])
        cand = next((c for c in prep.job.candidates if str(c.path) == ref), None)
        if cand is None:  # the study builder takes the reference from the candidates: a broken invariant
            raise MedpipeError(f"reference volume {ref} is not among the study's volumes")
        keys = cand.row.source_keys
        if not keys:
            raise MedpipeError(f"the catalog lists no source files for {cand.label}")
        datasets = []
        for key in keys:
            with open_key(key) as fh:
                datasets.append(pydicom.dcmread(fh, stop_before_pixels=True))
        order = cand.sidecar.get("SourceSOPInstanceUIDs")
        if isinstance(order, list) and order and all(isinstance(u, str) for u in order):
            rank = {u: i for i, u in enumerate(order)}
            pairs = sorted(zip(datasets, keys, strict=True),
                           key=lambda dk: rank.get(str(dk[0].get("SOPInstanceUID", "")), len(rank)))
            datasets, keys = [d for d, _ in pairs], [k for _, k in pairs]
        return datasets, keys

    def _write_segmentation(self, prep: Any, pred: dict[str, Any], src: _Sources, folder: Path) -> dict[str, Any]:
        from medpipe.data.volumes import write_nifti
        from medpipe.dicom.frames import sample_frames
        from medpipe.dicom.seg import SegmentSpec, write_seg
        from medpipe.dicom.sr import write_seg_sr

        grid = prep.grid
        mask = pred["mask"]
        datasets, frames = src.datasets, src.frames
        classes = segment_classes(self.package.outputs)
        series_uid = str(datasets[0].SeriesInstanceUID)
        per_frame = sample_frames(mask, grid.affine, frames, interpolation="nearest")
        specs = [SegmentSpec(label=c["name"], category=c["category"], type=c["type"],
                             anatomic_region=c.get("anatomic_region")) for c in classes.values()]
        numbers = list(classes)  # class index -> segment number order (1..n)
        labels = np.zeros_like(per_frame)
        for seg_no, cls in enumerate(numbers, start=1):
            labels[per_frame == cls] = seg_no
        seg_type = "LABELMAP" if self.options.seg_type == "labelmap" else "BINARY"
        seg_path = folder / "seg.dcm"
        seg = write_seg(seg_path, datasets, labels, specs, self.algorithm,
                        self._identity(series_uid, "SEG", 1, f"SEG {self.package.name}"),
                        segmentation_type=seg_type, content_label="MEDPIPE",
                        content_description=f"{self.package.name} (model {self.package.version})"[:64])
        voxel_ml = float(np.prod(grid.spacing)) / 1000.0
        volumes = {n: float((mask == cls).sum()) * voxel_ml for n, cls in enumerate(numbers, start=1)}
        sr_path = folder / "sr.dcm"
        write_seg_sr(sr_path, seg, datasets, self.algorithm,
                     self._identity(series_uid, "SR", 2, f"SR {self.package.name}"), volumes_ml=volumes)
        out: dict[str, Any] = {}
        for n, cls in enumerate(numbers, start=1):
            out[f"{classes[cls]['name'].replace(' ', '_')}_ml"] = round(volumes[n], 3)
        out.update(seg=str(seg_path.relative_to(self.out)), sr=str(sr_path.relative_to(self.out)))
        if self.options.nifti:
            nifti = folder / "mask.nii.gz"
            write_nifti(mask, grid.affine, nifti)
            out["nifti"] = str(nifti.relative_to(self.out))
        if self.options.explain and pred.get("foreground") is not None:
            out.update(self._write_map(pred["foreground"], grid, src, per_frame > 0, folder, series_uid,
                                       quantity=PROBABILITY, label="foreground probability"))
        out["preview"] = str(self._preview(seg_path, src, folder).relative_to(self.out))
        return out

    def _write_findings(self, pred: dict[str, Any], src: _Sources, folder: Path) -> dict[str, Any]:
        from medpipe.dicom.sc import write_overlay_sc
        from medpipe.dicom.sr import PointFinding, write_findings_sr
        from medpipe.io import write_csv_atomic

        outputs = self.package.outputs
        threshold = float(self.package.inference.get("report_threshold", 0.5))
        series_uid = str(src.datasets[0].SeriesInstanceUID)
        # numbered by score, highest first (as the detector returns them): "Nodule n" is the same finding in the SR,
        # findings.csv and the key image's description
        findings = sorted(pred["findings"], key=lambda f: -f.score)
        reported = [f for f in findings if f.score >= threshold]
        points = [PointFinding(center=f.center_lps, diameter_mm=round(f.diameter_mm, 2), score=round(f.score, 4),
                               label=f"Nodule {n}", finding=outputs.get("finding") or FINDING,
                               finding_site=outputs.get("finding_site"))
                  for n, f in enumerate(reported, start=1)]
        sr_path = folder / "sr.dcm"
        write_findings_sr(sr_path, src.datasets, points, self.algorithm,
                          self._identity(series_uid, "SR", 2, f"SR {self.package.name}"))
        rows, keys = [], []
        for n, f in enumerate(findings, start=1):
            i, (r, c) = nearest_frame(src.frames, f.center_lps)
            row = {"finding": n, "x": round(f.center_lps[0], 2), "y": round(f.center_lps[1], 2),
                   "z": round(f.center_lps[2], 2), "diameter_mm": round(f.diameter_mm, 2), "score": round(f.score, 4),
                   "reported": f.score >= threshold, "frame_sop_instance_uid": src.frames[i].sop_instance_uid,
                   "key_image": ""}
            if row["reported"]:
                frame = src.frames[i]
                radius = max(2.0, f.diameter_mm / 2.0 / min(frame.pixel_spacing))
                rr, cc = np.mgrid[:frame.rows, :frame.columns]
                disk = (rr - r) ** 2 + (cc - c) ** 2 <= radius ** 2
                path = folder / f"finding_{n:02d}_sc.dcm"
                write_overlay_sc(path, src.full(i), self._identity(series_uid, "SC", 4, f"KEY {self.package.name}", n),
                                 frame_number=frame.frame_number, outline=disk, window=LUNG_WINDOW,
                                 description=f"Nodule {n}: {f.diameter_mm:.1f} mm, score {f.score:.2f}")
                row["key_image"] = str(path.relative_to(self.out))
                keys.append(row["key_image"])
            rows.append(row)
        csv_path = folder / "findings.csv"
        write_csv_atomic(csv_path, rows, ["finding", "x", "y", "z", "diameter_mm", "score", "reported",
                                          "frame_sop_instance_uid", "key_image"])
        return {"findings": len(reported), "max_score": round(max((f.score for f in findings), default=0.0), 4),
                "report_threshold": round(threshold, 4), "sr": str(sr_path.relative_to(self.out)),
                "findings_csv": str(csv_path.relative_to(self.out)), "key_images": ";".join(keys)}

    def _write_classification(self, prep: Any, pred: dict[str, Any], src: _Sources, folder: Path
                              ) -> dict[str, Any]:
        from medpipe.dicom.sr import ClassResult, write_classification_sr

        prob = pred["probabilities"]
        names = {int(k): str(v) for k, v in (self.package.outputs.get("class_names") or {}).items()}
        codes = self.package.outputs.get("class_codes") or {}
        decided, thr = decision(prob, self.package.outputs)
        reported = [positive_class(self.package.outputs)] if len(prob) == 2 else list(range(len(prob)))
        results = [ClassResult(finding=codes.get(str(k)) or FINDING, probability=float(prob[k]), threshold=thr,
                               label=names.get(k, f"class {k}"))
                   for k in reported]
        series_uid = str(src.datasets[0].SeriesInstanceUID)
        sr_path = folder / "sr.dcm"
        write_classification_sr(sr_path, src.datasets, results, self.algorithm,
                                self._identity(series_uid, "SR", 2, f"SR {self.package.name}"))
        out: dict[str, Any] = {f"{names.get(k, f'class_{k}').replace(' ', '_')}_probability": round(float(p), 6)
                               for k, p in enumerate(prob)}
        out.update(decision=names.get(decided, str(decided)), threshold=thr, sr=str(sr_path.relative_to(self.out)))
        if self.options.explain and pred.get("map") is not None:
            out.update(self._write_map(pred["map"], prep.grid, src, None, folder, series_uid,
                                       quantity=None, label=f"Grad-CAM ({names.get(decided, decided)})"))
        return out

    def _write_map(self, volume: np.ndarray, grid: Any, src: _Sources, mask_frames: np.ndarray | None, folder: Path,
                   series_uid: str, *, quantity: dict[str, str] | None, label: str) -> dict[str, Any]:
        from medpipe.dicom.frames import sample_frames
        from medpipe.dicom.pmap import write_parametric_map
        from medpipe.dicom.sc import write_overlay_sc

        datasets, frames = src.datasets, src.frames
        values = np.clip(sample_frames(volume, grid.affine, frames, interpolation="linear"), 0.0, 1.0)
        pm_path = folder / "map_pm.dcm"
        options: dict[str, Any] = {"content_description": label[:64]}
        if quantity is not None:
            options["quantity"] = quantity
        write_parametric_map(pm_path, datasets, values.astype(np.float32), self.algorithm,
                             self._identity(series_uid, "PM", 3, f"MAP {self.package.name}"), **options)
        # key frames: the most segmented first, then (ties, or no mask) the most probable / salient
        counts = np.zeros(len(frames)) if mask_frames is None else mask_frames.reshape(len(frames), -1).sum(1)
        key_frames = [int(i) for i in np.lexsort((-values.reshape(len(frames), -1).mean(1), -counts))[:SC_FRAMES]]
        written = []
        for n, i in enumerate(sorted(key_frames), start=1):
            ds = src.full(i)
            path = folder / f"overlay_{n:02d}_sc.dcm"
            write_overlay_sc(path, ds, self._identity(series_uid, "SC", 4, f"OVERLAY {self.package.name}", n),
                             frame_number=frames[i].frame_number, overlay=values[i],
                             outline=None if mask_frames is None else mask_frames[i],
                             description=f"{label} over source frame"[:64])
            written.append(str(path.relative_to(self.out)))
        return {"map": str(pm_path.relative_to(self.out)), "overlays": ";".join(written)}

    def _preview(self, seg_path: Path, src: _Sources, folder: Path) -> Path:
        from medpipe.report.seg_preview import seg_preview_png

        path = folder / "preview.png"
        seg_preview_png(seg_path, src.frames, src.full, path,
                        title=f"{self.package.name}: the written SEG, read back, over its source frames")
        return path


def decision(prob: np.ndarray, outputs: Mapping[str, Any]) -> tuple[int, float]:
    """(decided class, threshold used) of a classifier's probabilities under its package's ``outputs``:
    binary -> the positive class when its probability reaches the threshold, else the other; else the argmax
    (and its probability)."""
    if len(prob) == 2:
        pos = positive_class(outputs)
        thr = float(outputs.get("threshold", 0.5))
        return (pos if prob[pos] >= thr else 1 - pos), thr
    k = int(np.argmax(prob))
    return k, float(prob[k])


def positive_class(outputs: Mapping[str, Any]) -> int:
    """The positive class of a binary classifier's package ``outputs`` (default 1)."""
    return int(outputs.get("positive_class", 1))


def segment_classes(outputs: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """A segmenter package's classes (class index -> name and coded category / type), in class order."""
    classes = outputs.get("classes") or {}
    out = {}
    for k, c in sorted(classes.items(), key=lambda kv: int(kv[0])):
        c = c if isinstance(c, dict) else {"name": str(c)}
        code = segment_code(c["name"], {x: c[x] for x in ("category", "type") if x in c} or None)
        out[int(k)] = {**c, "category": code["category"], "type": code["type"]}
    return out


def nearest_frame(frames: list[Any], lps: tuple[float, float, float]) -> tuple[int, tuple[float, float]]:
    """The source frame whose plane is nearest to the point ``lps`` (patient coordinates, mm) and the point's
    (row, column) there, from the frame's own position, orientation and pixel spacing."""
    p = np.asarray(lps, dtype=np.float64)
    best, where = -1, (0.0, 0.0)
    dist = np.inf
    for i, fr in enumerate(frames):
        iop = np.asarray(fr.orientation, dtype=np.float64)
        d = p - np.asarray(fr.position, dtype=np.float64)
        off = abs(float(np.dot(d, slice_normal(fr.orientation))))
        if off < dist:
            dist, best = off, i
            where = (float(np.dot(d, iop[3:])) / fr.pixel_spacing[0], float(np.dot(d, iop[:3])) / fr.pixel_spacing[1])
    if best < 0:  # no frames, or a point that is not finite: never a silent "last frame" (index -1)
        raise MedpipeError(f"no source frame is near the point {tuple(float(v) for v in p)}")
    return best, where


class _Sources:
    """The reference series: headers, file keys and frame geometry, index-aligned; full datasets on demand."""

    def __init__(self, datasets: list[Any], keys: list[str], frames: list[Any]) -> None:
        self.datasets, self.keys, self.frames = datasets, keys, frames
        self._index = {}
        from medpipe.dicom.frames import instance_uid

        for i, ds in enumerate(datasets):
            self._index[instance_uid(ds)] = i

    def full(self, frame_index: int) -> Any:
        """The dataset (with pixel data) holding frame ``frame_index`` of :attr:`frames`."""
        import pydicom

        from medpipe.dicom.sources import open_key

        uid = self.frames[frame_index].sop_instance_uid
        with open_key(self.keys[self._index[uid]]) as fh:
            return pydicom.dcmread(fh)
