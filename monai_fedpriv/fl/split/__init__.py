"""SplitNN (Vepakomma, Gupta, Swedish and Raskar 2018, "Split learning for health"), U-shaped for a U-Net: the site
keeps the first down block and the head, the server the rest; per batch, cut-layer features and gradients cross the
wire through the codec (:mod:`.link` on the site's side, :mod:`.server` on the server's)."""

from monai_fedpriv.fl.split.link import CodecLink, RemoteSkip, install_split
from monai_fedpriv.fl.split.server import SplitServer

__all__ = ["CodecLink", "RemoteSkip", "SplitServer", "install_split"]
