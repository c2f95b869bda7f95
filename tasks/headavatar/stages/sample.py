"""Stage 2: keep every ``sample.frame_stride``-th extracted frame, by index, server-side.

No pixel passes through this process: frames are selected from stage 1's frame index and
manifest and copied inside the object store, so the cost does not depend on image size.
"""

from __future__ import annotations

import json
import logging

from headavatar.contract.stage import Stage, StageContext
from headavatar.errors import UpstreamMissing
from headavatar.layout import FRAMES_INDEX

log = logging.getLogger(__name__)
PER_FRAME = ("images/{f}/image_{c}.jpg", "images/{f}/image_lowres_{c}.jpg", "images/{f}/visible_{c}.jpg",
             "images/{f}/visible_lowres_{c}.jpg", "cameras/{f}/camera_{c}.npz")


class Sample(Stage):
    name = "sample"
    inputs = ("extract",)
    config_sections = ("capture", "sample")
    code_version = 1  # bump when a change makes this stage's outputs differ (docs/caching.md)

    def run(self, ctx: StageContext) -> None:
        extract = ctx.upstream["extract"]
        index = json.loads(ctx.store.get_bytes(ctx.input_key("extract", FRAMES_INDEX)))
        stride = ctx.config.sample.frame_stride
        if stride % index["sample_stride"]:
            raise UpstreamMissing(
                f"sample.frame_stride={stride} needs extracted frames that stage 1 (written for stride "
                f"{index['sample_stride']}) did not write; re-run extract with the same settings"
            )
        by_index = {w["index"]: w for w in index["written"]}
        kept = [e for e in range(0, index["total_extracted"], stride)]
        copies = [(f"background/image_{c}.jpg") for c in ctx.config.capture.cameras]
        for e in kept:
            copies += [t.format(f=f"{e:04d}", c=c) for c in ctx.config.capture.cameras for t in PER_FRAME]
        absent = [rel for rel in copies if rel not in extract.files]
        if absent:
            raise UpstreamMissing(f"stage 'extract' output lacks {len(absent)} file(s) to sample, e.g. {absent[0]}")
        log.info("%s: keeping %d of %d extracted frames (stride %d), %d server-side copies",
                 ctx.capture, len(kept), index["total_extracted"], stride, len(copies))
        for rel in copies:
            ctx.outputs.copy_from(ctx.input_key("extract", rel), rel, extract.files[rel])
        frames = [{"folder": f"{e:04d}", "sequence": by_index[e]["sequence"],
                   "video_frame": by_index[e]["video_frame"]} for e in kept]
        ctx.outputs.put_bytes(FRAMES_INDEX, json.dumps({"frames": frames, "cameras": list(ctx.config.capture.cameras)},
                                                       indent=1).encode())
        ctx.metrics.update({"frames_kept": len(kept), "extracted_frames": index["total_extracted"],
                            "objects_copied": len(copies)})
