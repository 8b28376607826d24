"""Files moekit writes: atomic, checksummed, verified on load, and never in place of someone else's.

Three rules:

* **Atomic.** A file is written under a temporary name in its folder, fsynced, then renamed: a
  reader never sees half a file under the final name. A new folder is written whole under a
  temporary name (``.NAME.moekit-tmp-HOST-PID-RANDOM``) and renamed when complete: it is complete or absent.
* **Checksummed.** Every moekit folder (a model, a checkpoint, a converted model, a MoLE table, an
  expert store, a training run) carries ``moekit.json``: its kind and, for each file, its size and
  SHA-256 (or, for a large file read in blocks, the name of the per-block checksums that guard it).
  :func:`verify` checks them on load and names the file and the way to recover.
* **Ours only.** :func:`check_target` refuses to write into an existing folder that is not empty
  and not moekit's own folder of the same kind; moekit removes only files its manifest lists, and
  temporary folders of its own naming whose writer is gone.

Modules: :mod:`~moekit.io.files` (single files), :mod:`~moekit.io.manifest` (``moekit.json``),
:mod:`~moekit.io.folders` (whole folders), :mod:`~moekit.io.faults` (fault injection for tests).
"""

from moekit.io.errors import IntegrityError, MoekitWarning
from moekit.io.faults import fault_hook, fault_point
from moekit.io.files import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    dumps,
    inside,
    json_safe,
    read_json,
    sha256_file,
)
from moekit.io.folders import (
    FolderWriter,
    check_report_target,
    check_target,
    claim_folder,
    clean_stale,
    publish,
    remove_folder,
    staging_dir,
    write_folder,
)
from moekit.io.manifest import (
    MANIFEST,
    kind_of,
    read_manifest,
    record_files,
    update_manifest,
    verify,
    verify_file,
    write_manifest,
)

__all__ = ["IntegrityError", "MANIFEST", "MoekitWarning", "FolderWriter", "atomic_write", "atomic_write_bytes",
           "atomic_write_text", "check_report_target", "check_target", "claim_folder", "clean_stale", "dumps", "fault_hook", "fault_point", "inside",
           "json_safe", "kind_of", "publish", "read_json", "read_manifest", "record_files", "remove_folder", "sha256_file",
           "staging_dir", "update_manifest", "verify", "verify_file", "write_folder", "write_manifest"]
