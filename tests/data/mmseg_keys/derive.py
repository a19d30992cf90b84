"""Write the state-dict names and shapes of mmsegmentation 1.2.2 models, one file per model.

The lists are derived by hand from mmseg's module structure, never from our own models:
each function below re-traces the ``__init__`` of one mmseg/mmcv class (which children it
registers, under which names, with which shapes) for the arguments of mmseg's configs
(``configs/_base_/models/{fcn_hr18,ocrnet_hr18,setr_naive,setr_pup,setr_mla}.py`` and the
ADE20K SETR configs ``configs/setr/setr_vit-l_{naive,pup,mla}_8xb2-160k_ade20k-512x512.py``,
whose ``auxiliary_head`` lists replace the base ones). The mmseg/mmcv rules used:

* ``build_norm_layer(BN/SyncBN, c, postfix=k)`` is named ``bn<k>``, with LN ``ln<k>``; a BN
  holds ``weight, bias, running_mean, running_var`` (c,) and ``num_batches_tracked`` ();
* mmcv ``ConvModule(cin, cout, k)`` with a norm: ``conv.weight`` (no bias: ``bias='auto'``)
  and ``bn.*``; the activation has no parameters;
* ``BaseDecodeHead``: ``conv_seg`` (1x1 conv with bias), dropout without parameters; a list
  of heads is an ``nn.ModuleList`` (``decode_head.0``, ``auxiliary_head.2`` ...);
* mmseg ``HRNet`` (``backbones/hrnet.py``): stem ``conv1/bn1/conv2/bn2``, ``layer1`` of
  ResNet Bottlenecks (``conv1..3``, ``bn1..3``, ``downsample.0/1``), ``transition<k>``,
  ``stage<k>.<m>.branches.<b>.<block>`` (BasicBlocks ``conv1/bn1/conv2/bn2``) and
  ``fuse_layers.<i>.<j>`` (j > i: ``0`` 1x1 conv, ``1`` BN, ``2`` Upsample; j < i:
  ``<k>.0`` 3x3 stride-2 conv, ``<k>.1`` BN);
* mmseg ``VisionTransformer`` (``backbones/vit.py``, ``patch_bias=False``, ``final_norm=False``):
  ``patch_embed.projection.weight``, ``cls_token`` (1, 1, D), ``pos_embed`` (1, 1 + N, D) for
  ``img_size`` (kept even with ``with_cls_token=False``), ``layers.<i>.ln1/ln2``,
  ``layers.<i>.attn.attn`` (mmcv ``MultiheadAttention`` around ``nn.MultiheadAttention``:
  ``in_proj_weight/bias``, ``out_proj``), ``layers.<i>.ffn.layers.0.0`` and ``ffn.layers.1``
  (mmcv ``FFN``: ``Sequential(Sequential(Linear, GELU, Dropout), Linear, Dropout)``);
* ``SETRUPHead``: ``norm`` (LN), ``up_convs.<i>.0`` ConvModule, ``up_convs.<i>.1`` Upsample;
  ``MLANeck``: ``norm.<i>``, ``mla.channel_proj.<i>`` (1x1), ``mla.feat_extract.<i>`` (3x3);
  ``SETRMLAHead``: ``up_convs.<i>.0/1`` (3x3) + Upsample; ``FCNHead``: ``convs.<i>``
  (``nn.Identity`` for ``num_convs=0``), ``conv_seg``; ``OCRHead``: ``bottleneck`` (3x3),
  ``object_context_block`` (``query_project``/``key_project``: 2 ConvModules in a Sequential,
  ``value_project``/``out_project``: one ConvModule each, ``bottleneck`` 1x1 on 2C).

Run ``python tests/data/mmseg_keys/derive.py`` to rewrite the ``*.txt`` files; each line is
``<name> <dim> <dim> ...`` (no dims: a scalar). ``tests/test_segmentors_mmseg_keys.py`` checks
that the files are what this script writes and that our converters accept exactly them.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent


class Keys:
    """An ordered ``name -> shape`` list built like a module's ``state_dict``."""

    def __init__(self):
        self.items: dict[str, tuple[int, ...]] = {}

    def add(self, name: str, *shape: int) -> None:
        assert name not in self.items, name
        self.items[name] = tuple(shape)

    # mmcv / torch building blocks
    def bn(self, p: str, c: int) -> None:
        for t in ("weight", "bias", "running_mean", "running_var"):
            self.add(f"{p}.{t}", c)
        self.add(f"{p}.num_batches_tracked")

    def ln(self, p: str, c: int) -> None:
        self.add(f"{p}.weight", c)
        self.add(f"{p}.bias", c)

    def conv(self, p: str, cin: int, cout: int, k: int, bias: bool = False) -> None:
        self.add(f"{p}.weight", cout, cin, k, k)
        if bias:
            self.add(f"{p}.bias", cout)

    def conv_module(self, p: str, cin: int, cout: int, k: int) -> None:
        self.conv(f"{p}.conv", cin, cout, k)
        self.bn(f"{p}.bn", cout)

    def linear(self, p: str, cin: int, cout: int) -> None:
        self.add(f"{p}.weight", cout, cin)
        self.add(f"{p}.bias", cout)

    def conv_seg(self, p: str, channels: int, num_classes: int) -> None:
        self.conv(f"{p}.conv_seg", channels, num_classes, 1, bias=True)


# --------------------------------------------------------------------------- HRNet
def hrnet(k: Keys, p: str, width: int) -> list[int]:
    """mmseg ``HRNet`` with the fcn_hr18/hr48 ``extra``: stage1 1 module of 4 Bottlenecks
    (64), stages 2/3/4 with 1/4/3 modules of 4 BasicBlocks per branch, widths W·(1, 2, 4, 8)."""
    k.conv(f"{p}.conv1", 3, 64, 3)
    k.bn(f"{p}.bn1", 64)
    k.conv(f"{p}.conv2", 64, 64, 3)
    k.bn(f"{p}.bn2", 64)
    # layer1 = _make_layer(Bottleneck, 64, 64, 4): expansion 4, downsample on block 0
    inplanes = 64
    for b in range(4):
        q = f"{p}.layer1.{b}"
        k.conv(f"{q}.conv1", inplanes, 64, 1)
        k.bn(f"{q}.bn1", 64)
        k.conv(f"{q}.conv2", 64, 64, 3)
        k.bn(f"{q}.bn2", 64)
        k.conv(f"{q}.conv3", 64, 256, 1)
        k.bn(f"{q}.bn3", 256)
        if b == 0:
            k.conv(f"{q}.downsample.0", inplanes, 256, 1)
            k.bn(f"{q}.downsample.1", 256)
        inplanes = 256
    pre = [256]
    widths = [width, 2 * width, 4 * width, 8 * width]
    for stage, modules in ((2, 1), (3, 4), (4, 3)):
        cur = widths[:stage]
        # _make_transition_layer(pre, cur)
        for i, c in enumerate(cur):
            q = f"{p}.transition{stage - 1}.{i}"
            if i < len(pre):
                if c != pre[i]:
                    k.conv(f"{q}.0", pre[i], c, 3)
                    k.bn(f"{q}.1", c)
            else:
                for j in range(i + 1 - len(pre)):
                    cin = pre[-1]
                    cout = c if j == i - len(pre) else cin
                    k.conv(f"{q}.{j}.0", cin, cout, 3)
                    k.bn(f"{q}.{j}.1", cout)
        for m in range(modules):
            q = f"{p}.stage{stage}.{m}"
            for b, c in enumerate(cur):   # BasicBlock, expansion 1: no downsample
                for blk in range(4):
                    r = f"{q}.branches.{b}.{blk}"
                    k.conv(f"{r}.conv1", c, c, 3)
                    k.bn(f"{r}.bn1", c)
                    k.conv(f"{r}.conv2", c, c, 3)
                    k.bn(f"{r}.bn2", c)
            for i in range(len(cur)):       # multiscale_output=True: every output branch
                for j in range(len(cur)):
                    r = f"{q}.fuse_layers.{i}.{j}"
                    if j > i:
                        k.conv(f"{r}.0", cur[j], cur[i], 1)
                        k.bn(f"{r}.1", cur[i])
                    elif j < i:
                        for s in range(i - j):
                            cout = cur[i] if s == i - j - 1 else cur[j]
                            k.conv(f"{r}.{s}.0", cur[j], cout, 3)
                            k.bn(f"{r}.{s}.1", cout)
        pre = cur
    return widths


def fcn_hrnet(width: int, num_classes: int) -> Keys:
    k = Keys()
    c = sum(hrnet(k, "backbone", width))
    # FCNHead(resize_concat: in_channels = channels = sum, num_convs=1, kernel 1, no concat)
    k.conv_module("decode_head.convs.0", c, c, 1)
    k.conv_seg("decode_head", c, num_classes)
    return k


def ocrnet_hrnet(width: int, num_classes: int, channels: int = 512, ocr_channels: int = 256) -> Keys:
    k = Keys()
    c = sum(hrnet(k, "backbone", width))
    k.conv_module("decode_head.0.convs.0", c, c, 1)
    k.conv_seg("decode_head.0", c, num_classes)
    p = "decode_head.1"
    # OCRHead.__init__ registers object_context_block, spatial_gather_module, bottleneck in this
    # order (BaseDecodeHead's conv_seg first)
    k.conv_seg(p, channels, num_classes)
    q = f"{p}.object_context_block"
    for proj in ("key_project", "query_project"):
        k.conv_module(f"{q}.{proj}.0", channels, ocr_channels, 1)
        k.conv_module(f"{q}.{proj}.1", ocr_channels, ocr_channels, 1)
    k.conv_module(f"{q}.value_project", channels, ocr_channels, 1)
    k.conv_module(f"{q}.out_project", ocr_channels, channels, 1)
    k.conv_module(f"{q}.bottleneck", 2 * channels, channels, 1)
    k.conv_module(f"{p}.bottleneck", c, channels, 3)
    return k


# --------------------------------------------------------------------------- SETR
def vit(k: Keys, p: str, img_size: int, depth: int, dim: int, mlp_ratio: int = 4, patch: int = 16) -> None:
    k.conv(f"{p}.patch_embed.projection", 3, dim, patch)      # patch_bias=False
    k.add(f"{p}.cls_token", 1, 1, dim)
    k.add(f"{p}.pos_embed", 1, 1 + (img_size // patch) ** 2, dim)
    for i in range(depth):
        q = f"{p}.layers.{i}"
        k.ln(f"{q}.ln1", dim)
        k.add(f"{q}.attn.attn.in_proj_weight", 3 * dim, dim)
        k.add(f"{q}.attn.attn.in_proj_bias", 3 * dim)
        k.linear(f"{q}.attn.attn.out_proj", dim, dim)
        k.ln(f"{q}.ln2", dim)
        k.linear(f"{q}.ffn.layers.0.0", dim, mlp_ratio * dim)
        k.linear(f"{q}.ffn.layers.1", mlp_ratio * dim, dim)


def setr_up_head(k: Keys, p: str, dim: int, channels: int, num_classes: int, num_convs: int,
                 kernel: int) -> None:
    k.conv_seg(p, channels, num_classes)
    k.ln(f"{p}.norm", dim)
    for i in range(num_convs):
        k.conv_module(f"{p}.up_convs.{i}.0", dim if i == 0 else channels, channels, kernel)


def setr(variant: str, num_classes: int, img_size: int = 512, depth: int = 24, dim: int = 1024,
         mlp_ratio: int = 4, channels: int = 256, mla_channels: int = 128) -> Keys:
    """SETR as mmseg's ADE20K configs (ViT-L by default: depth 24, D 1024)."""
    k = Keys()
    vit(k, "backbone", img_size, depth, dim, mlp_ratio)
    if variant == "naive":   # decode: 1 conv k=1; 3 aux: 2 convs k=1
        setr_up_head(k, "decode_head", dim, channels, num_classes, 1, 1)
        for a in range(3):
            setr_up_head(k, f"auxiliary_head.{a}", dim, channels, num_classes, 2, 1)
    elif variant == "pup":   # decode: 4 convs k=3; 3 aux: 2 convs k=3
        setr_up_head(k, "decode_head", dim, channels, num_classes, 4, 3)
        for a in range(3):
            setr_up_head(k, f"auxiliary_head.{a}", dim, channels, num_classes, 2, 3)
    elif variant == "mla":
        for i in range(4):
            k.ln(f"neck.norm.{i}", dim)
        for i in range(4):
            k.conv_module(f"neck.mla.channel_proj.{i}", dim, channels, 1)
        for i in range(4):
            k.conv_module(f"neck.mla.feat_extract.{i}", channels, channels, 3)
        k.conv_seg("decode_head", 4 * mla_channels, num_classes)
        for i in range(4):
            k.conv_module(f"decode_head.up_convs.{i}.0", channels, mla_channels, 3)
            k.conv_module(f"decode_head.up_convs.{i}.1", mla_channels, mla_channels, 3)
        for a in range(4):   # FCNHead(num_convs=0): convs = Identity
            k.conv_seg(f"auxiliary_head.{a}", channels, num_classes)
    else:
        raise ValueError(variant)
    return k


#: file -> (keys, the mmseg 1.2.2 config whose checkpoints have them)
def models() -> dict[str, tuple[Keys, str]]:
    return {
        "fcn_hr18": (fcn_hrnet(18, 21), "fcn_hr18_4xb4-20k_voc12aug-512x512 (21 classes)"),
        "ocrnet_hr18": (ocrnet_hrnet(18, 21), "ocrnet_hr18_4xb4-20k_voc12aug-512x512 (21 classes)"),
        "setr_naive": (setr("naive", 150), "setr_vit-l_naive_8xb2-160k_ade20k-512x512 (150 classes)"),
        "setr_pup": (setr("pup", 150), "setr_vit-l_pup_8xb2-160k_ade20k-512x512 (150 classes)"),
        "setr_mla": (setr("mla", 150), "setr_vit-l_mla_8xb2-160k_ade20k-512x512 (150 classes)"),
    }


def is_buffer(name: str) -> bool:
    return name.endswith(("running_mean", "running_var", "num_batches_tracked"))


def render(keys: Keys, config: str) -> str:
    n_params = sum(_numel(s) for n, s in keys.items.items() if not is_buffer(n))
    lines = [f"# mmsegmentation 1.2.2 {config}: state_dict names and shapes",
             f"# derived by hand from mmseg's module structure (tests/data/mmseg_keys/derive.py)",
             f"# {len(keys.items)} entries, {n_params} parameters"]
    lines += [" ".join([name, *map(str, shape)]) for name, shape in keys.items.items()]
    return "\n".join(lines) + "\n"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read(path: Path) -> dict[str, tuple[int, ...]]:
    """A written file back as ``name -> shape``."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line and not line.startswith("#"):
            name, *dims = line.split()
            out[name] = tuple(int(d) for d in dims)
    return out


if __name__ == "__main__":
    for name, (keys, config) in models().items():
        (HERE / f"{name}.txt").write_text(render(keys, config))
        print(f"{name}: {len(keys.items)} entries")
