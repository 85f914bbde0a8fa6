"""De-identification: DICOM PS3.15 Annex E profiles as data, keyed pseudonyms, re-identification of results.

Modules (one concern each):

* :mod:`~medpipe.deid.table`: Table E.1-1 (``data/e1_1.json``) and the profile options; the action per tag.
* :mod:`~medpipe.deid.keys`: the key file (0600) and every keyed derivation (UIDs, pseudonyms, date shifts).
* :mod:`~medpipe.deid.engine`: :class:`Deidentifier`, the table applied to one dataset, recursively.
* :mod:`~medpipe.deid.safe_private`: the short safe list of private attributes (Retain Safe Private).
* :mod:`~medpipe.deid.burned_in`: quarantine of images with burned-in text; the optional Tesseract check.
* :mod:`~medpipe.deid.mapping`: the private map (original <-> pseudonym) and the user's patient CSV.
* :mod:`~medpipe.deid.run`: ``medpipe deid`` (a whole export, parallel, resumable) and ingest's staging.
* :mod:`~medpipe.deid.reidentify`: ``medpipe reidentify`` (results on de-identified data -> original study).
* :mod:`~medpipe.deid.audit`: the identifying values of a dataset and a byte scan for them (tests, benchmark).

Nothing here imports torch, MONAI or :mod:`medpipe.models`.
"""
