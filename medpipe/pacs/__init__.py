"""PACS connectivity: query, pull and push over DIMSE (pynetdicom) and DICOMweb (dicomweb-client).

* :mod:`medpipe.pacs.nodes`: the node file (who the PACS is, who we are towards it);
* :mod:`medpipe.pacs.query`: study queries and ``pacs://NODE?...`` URLs;
* :mod:`medpipe.pacs.dimse` / :mod:`medpipe.pacs.web`: associations, C-ECHO / C-FIND / C-STORE, and
  QIDO-RS / WADO-RS / STOW-RS, with every failure turned into one :class:`~medpipe.errors.PacsError`
  line naming the cause and the fix;
* :mod:`medpipe.pacs.scp`: medpipe's storage SCP (C-MOVE destination, listener);
* :mod:`medpipe.pacs.pull` / :mod:`medpipe.pacs.push`: resumable pulls (C-MOVE, C-GET, WADO-RS) and pushes;
* :mod:`medpipe.pacs.listener`: ``medpipe listen``, the scoring router next to a PACS.

Nothing here imports pynetdicom, requests or torch at import time of this package.
"""
