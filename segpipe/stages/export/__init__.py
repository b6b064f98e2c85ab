"""Export: a region store's layers to Cloud-Optimized GeoTIFFs with a STAC Item."""

from segpipe.stages.export.cog import write_cog
from segpipe.stages.export.stac import write_stac_item

__all__ = ["write_cog", "write_stac_item"]
