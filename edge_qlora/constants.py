"""Constants shared by the hardware, its golden twins and the tools: number formats, code books, numerics widths
and limits.

This module is the single source of truth below both ``rtl/`` and ``golden/``: it imports numpy only (no torch, no
model), so elaborating a core loads neither. The tables are literal float32 bit patterns; ``tests/test_constants.py``
derives each one again (the code books with bitsandbytes' own float32 torch operations, the absmax thresholds
from the golden staircase model) and checks them bit for bit.
"""

import math
from dataclasses import dataclass, fields

import numpy as np

__all__ = [
    "FloatFormat", "FP32", "BF16", "FP16", "FORMATS",
    "BLOCKSIZES", "DYNAMIC_BLOCKSIZE", "NF4_CODE", "NF4_BOUNDS", "NF2_CODE", "NF3_CODE", "NF_CODES", "CODE_BITS",
    "NF_OFFSET", "DYNAMIC_CODE", "ABSMAX_THRESHOLDS", "ABSMAX_FLOOR",
    "OPERAND_BITS", "OPERAND_FRAC", "ACC_BITS", "EXP_MIN", "MAX_LANES", "MAX_RANK", "GemmNumerics",
    "HYPER_FIELDS", "TINYLLAMA_PROJECTIONS",
    "DramTiming", "PAGE_POLICIES", "ADDRESS_MAPS", "ULX3S_SDRAM", "ECPIX5_DDR3", "DRAM_PRESETS",
]


# --- number formats -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FloatFormat:
    """An IEEE-754 style binary floating-point format: sign, biased exponent, fraction with a hidden bit.

    Parameters
    ----------
    name : str
        Short name, as used in :data:`FORMATS`.
    exp_bits : int
        Width of the exponent field, 2 to 8.
    frac_bits : int
        Width of the fraction field (the stored significand bits, without the hidden bit), 1 to 23.
    """

    name: str
    exp_bits: int
    frac_bits: int

    def __post_init__(self):
        if not isinstance(self.exp_bits, int) or not 2 <= self.exp_bits <= 8:
            raise ValueError(f"exp_bits must be an integer from 2 to 8 (a subset of fp32), not {self.exp_bits!r}")
        if not isinstance(self.frac_bits, int) or not 1 <= self.frac_bits <= 23:
            raise ValueError(f"frac_bits must be an integer from 1 to 23 (a subset of fp32), not {self.frac_bits!r}")

    @property
    def width(self):
        """Total width in bits: sign, exponent, fraction."""
        return 1 + self.exp_bits + self.frac_bits

    @property
    def bias(self):
        """Exponent bias: a normal value is ``1.fraction * 2 ** (exponent - bias)``."""
        return (1 << (self.exp_bits - 1)) - 1

    @property
    def precision(self):
        """Significant bits of a normal value, hidden bit included."""
        return self.frac_bits + 1

    @property
    def exp_max(self):
        """The all-ones exponent field, which encodes infinities and NaNs."""
        return (1 << self.exp_bits) - 1

    @property
    def inf_bits(self):
        """Bit pattern of positive infinity."""
        return self.exp_max << self.frac_bits

    @property
    def nan_bits(self):
        """Bit pattern of the canonical quiet NaN that every NaN result takes."""
        return self.inf_bits | (1 << (self.frac_bits - 1))

    @property
    def max_finite_bits(self):
        """Bit pattern of the largest finite value."""
        return self.inf_bits - 1

    @property
    def min_normal_bits(self):
        """Bit pattern of the smallest positive normal value."""
        return 1 << self.frac_bits

    @property
    def sign_bit(self):
        """Mask of the sign bit."""
        return 1 << (self.width - 1)

    @property
    def dtype(self):
        """The numpy unsigned integer type that holds a bit pattern of this format."""
        return np.dtype(np.uint16) if self.width <= 16 else np.dtype(np.uint32)


FP32 = FloatFormat("fp32", 8, 23)
BF16 = FloatFormat("bf16", 8, 7)
FP16 = FloatFormat("fp16", 5, 10)
FORMATS = {"fp32": FP32, "bf16": BF16, "fp16": FP16}


# --- NF4 and the 8-bit dynamic code (bitsandbytes' quantize_4bit) --------------------------------------------------

#: Block sizes bitsandbytes accepts for 4-bit quantization; the golden model covers all of them.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

#: Second-level block size of double quantization (``compress_statistics=True``) in ``quantize_4bit``.
DYNAMIC_BLOCKSIZE = 256

#: NF4 levels in code order (code 0 = -1.0, code 7 = 0.0, code 15 = 1.0): quantiles of N(0, 1), QLoRA appendix E.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)

#: The 15 decision bounds of NF4 quantization: float32 midpoints of neighbouring levels. A scaled weight ``s`` gets
#: code ``#(bounds < s)``; a tie ``s == bound`` goes to the lower code (``torch.bucketize``, ``right=False``).
NF4_BOUNDS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)

#: Code widths of the codebook formats (2, 3 and 4 bits per weight).
CODE_BITS = (2, 3, 4)

#: The quantile offset of the NormalFloat construction (QLoRA; LoftQ's ``create_normal_map``).
NF_OFFSET = 0.9677083

# NF2 and NF3 by NF4's construction (LoftQ's asymmetric ``create_normal_map``): normal quantiles at
# ``linspace(offset, 0.5, 2**(k-1) + 1)`` for the 2**(k-1) positive levels, at ``linspace(offset, 0.5, 2**(k-1))``
# for the 2**(k-1) - 1 negative ones, an exact zero, sorted and divided by the largest (float32). The same
# construction gives NF4_CODE bit for bit; tests/test_codebook.py derives all three again.

#: NF2 levels in code order (code 1 = 0.0), as float32 bit patterns.
NF2_CODE = np.array([0xBF800000, 0x00000000, 0x3EAD033A, 0x3F800000], dtype=np.uint32).view(np.float32)

#: NF3 levels in code order (code 3 = 0.0), as float32 bit patterns.
NF3_CODE = np.array([0xBF800000, 0xBEF50EE3, 0xBE5E5A6B, 0x00000000,
                     0x3E24CAE3, 0x3EAD033A, 0x3F1007AB, 0x3F800000], dtype=np.uint32).view(np.float32)

#: The NormalFloat table of each code width.
NF_CODES = {2: NF2_CODE, 3: NF3_CODE, 4: NF4_CODE}

#: bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), 256 sorted float32 levels, as bit patterns.
DYNAMIC_CODE = np.array([
    0xBF7E3333, 0xBF7A999A, 0xBF770000, 0xBF736666, 0xBF6FCCCD, 0xBF6C3333, 0xBF68999A, 0xBF650000,
    0xBF616666, 0xBF5DCCCD, 0xBF5A3333, 0xBF56999A, 0xBF530000, 0xBF4F6666, 0xBF4BCCCD, 0xBF483333,
    0xBF44999A, 0xBF410000, 0xBF3D6666, 0xBF39CCCD, 0xBF363334, 0xBF32999A, 0xBF2F0000, 0xBF2B6666,
    0xBF27CCCD, 0xBF243334, 0xBF20999A, 0xBF1D0000, 0xBF196666, 0xBF15CCCD, 0xBF123334, 0xBF0E999A,
    0xBF0B0000, 0xBF076666, 0xBF03CCCC, 0xBF003333, 0xBEF93332, 0xBEF20000, 0xBEEACCCC, 0xBEE3999A,
    0xBEDC6666, 0xBED53333, 0xBECE0000, 0xBEC6CCCC, 0xBEBF999A, 0xBEB86666, 0xBEB13333, 0xBEAA0000,
    0xBEA2CCCC, 0xBE9B999A, 0xBE946666, 0xBE8D3334, 0xBE860000, 0xBE7D9999, 0xBE6F3333, 0xBE60CCCD,
    0xBE526666, 0xBE440000, 0xBE35999A, 0xBE273333, 0xBE18CCCD, 0xBE0A6666, 0xBDF80000, 0xBDDB3334,
    0xBDC9EB85, 0xBDC428F7, 0xBDBE6667, 0xBDB8A3D7, 0xBDB2E148, 0xBDAD1EB8, 0xBDA75C2A, 0xBDA1999A,
    0xBD9BD70A, 0xBD96147B, 0xBD9051EB, 0xBD8A8F5D, 0xBD84CCCD, 0xBD7E147B, 0xBD728F5D, 0xBD670A3D,
    0xBD5B851F, 0xBD500000, 0xBD447AE1, 0xBD38F5C3, 0xBD2D70A3, 0xBD21EB85, 0xBD166667, 0xBD0AE148,
    0xBCFEB852, 0xBCE7AE15, 0xBCD0A3D7, 0xBCB9999A, 0xBCA28F5D, 0xBC8B851F, 0xBC68F5C3, 0xBC3AE148,
    0xBC1F3B64, 0xBC160418, 0xBC0CCCCD, 0xBC039581, 0xBBF4BC6A, 0xBBE24DD3, 0xBBCFDF3B, 0xBBBD70A4,
    0xBBAB020D, 0xBB989374, 0xBB8624DD, 0xBB676C8A, 0xBB428F5C, 0xBB1DB22D, 0xBAF1A9FC, 0xBAA7EF9D,
    0xBA7765FF, 0xBA59E83E, 0xBA3C6A80, 0xBA1EECC1, 0xBA016F01, 0xB9C7E283, 0xB98CE705, 0xB923D70B,
    0xB8BA1F4B, 0xB88AEFB3, 0xB8378034, 0xB7B24206, 0xB70205FF, 0xB65A1A94, 0xB513A3B7, 0x00000000,
    0x3513A3B7, 0x365A1A94, 0x370205FF, 0x37B24206, 0x38378034, 0x388AEFB3, 0x38BA1F4B, 0x3923D70B,
    0x398CE705, 0x39C7E283, 0x3A016F01, 0x3A1EECC1, 0x3A3C6A80, 0x3A59E83E, 0x3A7765FF, 0x3AA7EF9D,
    0x3AF1A9FC, 0x3B1DB22D, 0x3B428F5C, 0x3B676C8A, 0x3B8624DD, 0x3B989374, 0x3BAB020D, 0x3BBD70A4,
    0x3BCFDF3B, 0x3BE24DD3, 0x3BF4BC6A, 0x3C039581, 0x3C0CCCCD, 0x3C160418, 0x3C1F3B64, 0x3C3AE148,
    0x3C68F5C3, 0x3C8B851F, 0x3CA28F5D, 0x3CB9999A, 0x3CD0A3D7, 0x3CE7AE15, 0x3CFEB852, 0x3D0AE148,
    0x3D166667, 0x3D21EB85, 0x3D2D70A3, 0x3D38F5C3, 0x3D447AE1, 0x3D500000, 0x3D5B851F, 0x3D670A3D,
    0x3D728F5D, 0x3D7E147B, 0x3D84CCCD, 0x3D8A8F5D, 0x3D9051EB, 0x3D96147B, 0x3D9BD70A, 0x3DA1999A,
    0x3DA75C2A, 0x3DAD1EB8, 0x3DB2E148, 0x3DB8A3D7, 0x3DBE6667, 0x3DC428F7, 0x3DC9EB85, 0x3DDB3334,
    0x3DF80000, 0x3E0A6666, 0x3E18CCCD, 0x3E273333, 0x3E35999A, 0x3E440000, 0x3E526666, 0x3E60CCCD,
    0x3E6F3333, 0x3E7D9999, 0x3E860000, 0x3E8D3334, 0x3E946666, 0x3E9B999A, 0x3EA2CCCC, 0x3EAA0000,
    0x3EB13333, 0x3EB86666, 0x3EBF999A, 0x3EC6CCCC, 0x3ECE0000, 0x3ED53333, 0x3EDC6666, 0x3EE3999A,
    0x3EEACCCC, 0x3EF20000, 0x3EF93332, 0x3F003333, 0x3F03CCCC, 0x3F076666, 0x3F0B0000, 0x3F0E999A,
    0x3F123334, 0x3F15CCCD, 0x3F196666, 0x3F1D0000, 0x3F20999A, 0x3F243334, 0x3F27CCCD, 0x3F2B6666,
    0x3F2F0000, 0x3F32999A, 0x3F363334, 0x3F39CCCD, 0x3F3D6666, 0x3F410000, 0x3F44999A, 0x3F483333,
    0x3F4BCCCD, 0x3F4F6666, 0x3F530000, 0x3F56999A, 0x3F5A3333, 0x3F5DCCCD, 0x3F616666, 0x3F650000,
    0x3F68999A, 0x3F6C3333, 0x3F6FCCCD, 0x3F736666, 0x3F770000, 0x3F7A999A, 0x3F7E3333, 0x3F800000,
], dtype=np.uint32).view(np.float32)

#: The 255 ascending float32 steps of the double-quantization staircase: the 8-bit code of a normalized absmax in
#: [-1, 1] is the number of thresholds ``<= normed`` (derived in :mod:`edge_qlora.golden.absmax_quant`).
ABSMAX_THRESHOLDS = np.array([
    0xBF7C66FC, 0xBF78CCF8, 0xBF7532F5, 0xBF7198F1, 0xBF6E00EE, 0xBF6A66EA, 0xBF66CCE6, 0xBF6332E3,
    0xBF5F98DF, 0xBF5C00DC, 0xBF5866D8, 0xBF54CCD4, 0xBF5132D1, 0xBF4D98CD, 0xBF4A00CA, 0xBF4666C6,
    0xBF42CCC2, 0xBF3F32BF, 0xBF3B98BB, 0xBF3800B8, 0xBF3466B4, 0xBF30CCB1, 0xBF2D32AD, 0xBF2998A9,
    0xBF2600A6, 0xBF2266A2, 0xBF1ECC9F, 0xBF1B329B, 0xBF179A97, 0xBF140094, 0xBF106690, 0xBF0CCC8D,
    0xBF093289, 0xBF059A85, 0xBF020082, 0xBEFCCCFD, 0xBEF598F6, 0xBEEE64EE, 0xBEE734E9, 0xBEE000E1,
    0xBED8CCD9, 0xBED198D2, 0xBECA64CA, 0xBEC334C5, 0xBEBC00BD, 0xBEB4CCB5, 0xBEAD98AE, 0xBEA664A6,
    0xBE9F34A1, 0xBE980099, 0xBE90CC91, 0xBE89988A, 0xBE826482, 0xBE7668FA, 0xBE6800EA, 0xBE5998DA,
    0xBE4B30CD, 0xBE3CD0BD, 0xBE2E68B2, 0xBE2000A2, 0xBE119892, 0xBE033085, 0xBDE9A0EB, 0xBDD290D4,
    0xBDC710CB, 0xBDC140C4, 0xBDBB80BB, 0xBDB5C0BB, 0xBDB000B4, 0xBDAA40AB, 0xBDA480AB, 0xBD9EB0A4,
    0xBD98F09B, 0xBD933094, 0xBD8D7094, 0xBD87B08B, 0xBD81F084, 0xBD786108, 0xBD6CC0F7, 0xBD6140E8,
    0xBD55C0D7, 0xBD4A40D7, 0xBD3EC0C8, 0xBD3340B7, 0xBD27A0A8, 0xBD1C20A8, 0xBD10A097, 0xBD052088,
    0xBCF34110, 0xBCDC40EF, 0xBCC500D0, 0xBCAE00AF, 0xBC9700AF, 0xBC800090, 0xBC5200DF, 0xBC2D00DF,
    0xBC1A80A0, 0xBC1180A0, 0xBC0800A0, 0xBBFE0140, 0xBBEC0140, 0xBBD90140, 0xBBC70140, 0xBBB400BF,
    0xBBA200BF, 0xBB8F00BF, 0xBB7A017F, 0xBB54017F, 0xBB30017F, 0xBB0C017F, 0xBACC0100, 0xBA900100,
    0xBA680200, 0xBA480200, 0xBA300200, 0xBA100200, 0xB9E00400, 0xB9B00400, 0xB9600800, 0xB9000800,
    0xB8C01000, 0xB8801000, 0xB8002000, 0xB3000000, 0xB3000000, 0xB3000000, 0xB3000000, 0xB3000000,
    0xB3000000, 0xB3000000, 0xB3000000, 0x37FF8000, 0x387FC000, 0x38BFE000, 0x38FFE000, 0x395FF000,
    0x39AFF800, 0x39DFF800, 0x3A0FFC00, 0x3A2FFC00, 0x3A47FC00, 0x3A67FC00, 0x3A8FFE00, 0x3ACBFE00,
    0x3B0BFF00, 0x3B2FFF00, 0x3B53FF00, 0x3B79FF00, 0x3B8F0081, 0x3BA20081, 0x3BB40081, 0x3BC70081,
    0x3BD90081, 0x3BEC0081, 0x3BFE0081, 0x3C080041, 0x3C118041, 0x3C1A8041, 0x3C2D0041, 0x3C5200C0,
    0x3C800060, 0x3C970060, 0x3CAE00A1, 0x3CC500A1, 0x3CDC40A1, 0x3CF340E0, 0x3D052070, 0x3D10A091,
    0x3D1C2091, 0x3D27A091, 0x3D3340B0, 0x3D3EC0B0, 0x3D4A40B0, 0x3D55C0D1, 0x3D6140D1, 0x3D6CC0D1,
    0x3D7860F0, 0x3D81F078, 0x3D87B078, 0x3D8D7089, 0x3D933089, 0x3D98F098, 0x3D9EB098, 0x3DA48098,
    0x3DAA40A9, 0x3DB000A9, 0x3DB5C0A9, 0x3DBB80B8, 0x3DC140B8, 0x3DC710B8, 0x3DD290C9, 0x3DE9A0E9,
    0x3E03307C, 0x3E11988C, 0x3E20009C, 0x3E2E68AC, 0x3E3CD0BC, 0x3E4B30C5, 0x3E5998D5, 0x3E6800E5,
    0x3E7668F5, 0x3E826483, 0x3E899886, 0x3E90CC8E, 0x3E980096, 0x3E9F349E, 0x3EA664A6, 0x3EAD98AB,
    0x3EB4CCB3, 0x3EBC00BB, 0x3EC334C3, 0x3ECA64CB, 0x3ED198CE, 0x3ED8CCD6, 0x3EE000DE, 0x3EE734E6,
    0x3EEE64EE, 0x3EF598F3, 0x3EFCCCFB, 0x3F020082, 0x3F059A86, 0x3F09328A, 0x3F0CCC8B, 0x3F10668F,
    0x3F140093, 0x3F179A97, 0x3F1B329B, 0x3F1ECC9E, 0x3F2266A2, 0x3F2600A6, 0x3F2998AA, 0x3F2D32AE,
    0x3F30CCAF, 0x3F3466B3, 0x3F3800B7, 0x3F3B98BB, 0x3F3F32BF, 0x3F42CCC2, 0x3F4666C6, 0x3F4A00CA,
    0x3F4D98CE, 0x3F5132D2, 0x3F54CCD3, 0x3F5866D7, 0x3F5C00DB, 0x3F5F98DF, 0x3F6332E3, 0x3F66CCE6,
    0x3F6A66EA, 0x3F6E00EE, 0x3F7198F2, 0x3F7532F6, 0x3F78CCF7, 0x3F7C66FB, 0x3F7F18FF,
], dtype=np.uint32).view(np.float32)

#: bitsandbytes clamps the absmax it divides by to 1e-38 (a float32 subnormal) so all-zero blocks do not divide by 0.
ABSMAX_FLOOR = np.float32(1e-38)


# --- the GEMM engine's block-floating-point numerics ----------------------------------------------------------------

OPERAND_BITS = 18          # signed fixed-point operand width (one ECP5 MULT18X18D per MAC)
OPERAND_FRAC = OPERAND_BITS - 2   # the chunk's largest element lands in [2**16, 2**17)
ACC_BITS = 44              # chunk sums: 2 * 17 magnitude bits + log2(512) + sign
EXP_MIN = -126             # bf16 subnormals share the exponent of the smallest normal


@dataclass(frozen=True)
class GemmNumerics:
    """Parameters of the arithmetic.

    Parameters
    ----------
    chunk : int
        Elements of the reduction dimension that share one alignment exponent and one integer chunk sum, 8 to 512.
    out_dtype : str
        ``"bf16"`` or ``"fp32"``.
    """

    chunk: int = 64
    out_dtype: str = "bf16"

    def __post_init__(self):
        if not isinstance(self.chunk, int) or not 8 <= self.chunk <= 512:
            raise ValueError(f"chunk must be an integer from 8 to 512, not {self.chunk!r}")
        if self.out_dtype not in ("bf16", "fp32"):
            raise ValueError(f"out_dtype must be 'bf16' or 'fp32', not {self.out_dtype!r}")


# --- limits ---------------------------------------------------------------------------------------------------------

#: Most lanes (dequantizer and quantizer lanes, PE array rows and columns, row-aligner lanes) a core accepts.
MAX_LANES = 16

#: Largest LoRA rank of the blocked step's rank-r term (``rtl/rank_term.py``): one block-floating-point chunk of
#: the engine, whose chunk is at least 16.
MAX_RANK = 16



# --- the optimizer ---------------------------------------------------------------------------------------------------

#: The host-computed float32 constants of one optimizer step, in the order of the optimizer core's ``hyper`` port.
HYPER_FIELDS = ("lr", "weight_decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "step_size",
                "inv_bc2_sqrt", "decay")


# --- the target model -----------------------------------------------------------------------------------------------

#: TinyLlama-1.1B's seven projections per decoder layer: (name as transformers names it, in features, out features).
TINYLLAMA_PROJECTIONS = (
    ("q_proj", 2048, 2048), ("k_proj", 2048, 256), ("v_proj", 2048, 256), ("o_proj", 2048, 2048),
    ("gate_proj", 2048, 5632), ("up_proj", 2048, 5632), ("down_proj", 5632, 2048),
)


# --- external memory: DRAM timing (golden/dram.py models it, rtl/dram_model.py simulates it) ----------------------

PAGE_POLICIES = ("open", "closed")
ADDRESS_MAPS = ("row-bank-col", "bank-row-col")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class DramTiming:
    """Geometry and timing of one DRAM device (or a rank of devices on one bus) behind a controller.

    All ``t*`` fields, ``cl``, ``cwl``, ``rd_to_wr`` and ``wr_to_rd`` are in controller clock cycles (use
    :meth:`from_ns` to convert datasheet nanoseconds). ``data_rate`` is 1 for SDR and 2 for DDR; ``phy_ratio`` is
    the number of memory clocks per controller clock (1 for an SDR PHY, 2 for a 1:2 DDR PHY, 4 for 1:4), so the
    controller moves ``data_rate * phy_ratio`` DRAM words per cycle at peak. ``trc`` defaults to ``tras + trp``.
    """
    name: str
    data_width: int            # bits of the DRAM data bus
    clock_mhz: float           # controller clock
    burst_length: int          # DRAM words per READ/WRITE command
    cl: int                    # READ command to first read data
    trcd: int
    trp: int
    tras: int
    twr: int                   # end of write data to PRECHARGE
    trfc: int
    trefi: int
    banks: int
    rows: int
    columns: int
    trc: int = None
    cwl: int = 0               # WRITE command to first write data (0 for SDR)
    trtp: int = 1              # READ to PRECHARGE
    trrd: int = 1              # ACTIVATE to ACTIVATE, different banks
    rd_to_wr: int = None       # READ command to WRITE command; default cl + burst_cycles + 1 (one idle cycle)
    wr_to_rd: int = None       # WRITE command to READ command; default cwl + burst_cycles
    data_rate: int = 1
    phy_ratio: int = 1
    page_policy: str = "open"
    address_map: str = "row-bank-col"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("DramTiming.name must be a non-empty string")
        if not isinstance(self.clock_mhz, (int, float)) or isinstance(self.clock_mhz, bool) \
                or not math.isfinite(self.clock_mhz) or self.clock_mhz <= 0:
            raise ValueError(f"DramTiming.clock_mhz must be a positive number, not {self.clock_mhz!r}")
        if not _is_int(self.data_width) or self.data_width < 8 or self.data_width % 8:
            raise ValueError(f"DramTiming.data_width must be a positive multiple of 8 bits, not {self.data_width!r}")
        if self.data_rate not in (1, 2):
            raise ValueError(f"DramTiming.data_rate must be 1 (SDR) or 2 (DDR), not {self.data_rate!r}")
        if self.phy_ratio not in (1, 2, 4):
            raise ValueError(f"DramTiming.phy_ratio must be 1, 2 or 4 (memory clocks per controller clock), "
                             f"not {self.phy_ratio!r}")
        for f in ("banks", "rows", "columns", "burst_length"):
            v = getattr(self, f)
            if not _is_int(v) or v < 1 or v & (v - 1):
                raise ValueError(f"DramTiming.{f} must be a positive power of two, not {v!r}")
        wpc = self.data_rate * self.phy_ratio
        if self.burst_length % wpc:
            raise ValueError(f"DramTiming.burst_length ({self.burst_length}) must be a multiple of the words per "
                             f"controller cycle ({wpc})")
        if self.burst_length > self.columns:
            raise ValueError(f"DramTiming.burst_length ({self.burst_length}) exceeds the columns ({self.columns})")
        for f in ("cl", "trcd", "trp", "tras", "twr", "trfc", "trtp", "trrd"):
            v = getattr(self, f)
            if not _is_int(v) or v < 1:
                raise ValueError(f"DramTiming.{f} must be a positive whole number of cycles, not {v!r}")
        if not _is_int(self.cwl) or self.cwl < 0:
            raise ValueError(f"DramTiming.cwl must be a whole number of cycles >= 0, not {self.cwl!r}")
        if self.trc is None:
            object.__setattr__(self, "trc", self.tras + self.trp)
        elif not _is_int(self.trc) or self.trc < self.tras:
            raise ValueError(f"DramTiming.trc must be a whole number of cycles >= tras ({self.tras}), "
                             f"not {self.trc!r}")
        if self.rd_to_wr is None:
            object.__setattr__(self, "rd_to_wr", self.cl + self.burst_cycles + 1)
        elif not _is_int(self.rd_to_wr) or self.rd_to_wr < 1:
            raise ValueError(f"DramTiming.rd_to_wr must be a positive whole number of cycles, not {self.rd_to_wr!r}")
        if self.wr_to_rd is None:
            object.__setattr__(self, "wr_to_rd", max(1, self.cwl + self.burst_cycles))
        elif not _is_int(self.wr_to_rd) or self.wr_to_rd < 1:
            raise ValueError(f"DramTiming.wr_to_rd must be a positive whole number of cycles, not {self.wr_to_rd!r}")
        refresh_cost = self.trp + self.trfc + self.trcd + 2
        if not _is_int(self.trefi) or self.trefi <= refresh_cost:
            raise ValueError(f"DramTiming.trefi must be a whole number of cycles > trp + trfc + trcd + 2 "
                             f"({refresh_cost}), not {self.trefi!r}")
        if self.page_policy not in PAGE_POLICIES:
            raise ValueError(f"DramTiming.page_policy must be one of {', '.join(PAGE_POLICIES)}, "
                             f"not {self.page_policy!r}")
        if self.address_map not in ADDRESS_MAPS:
            raise ValueError(f"DramTiming.address_map must be one of {', '.join(ADDRESS_MAPS)}, "
                             f"not {self.address_map!r}")

    # Derived quantities
    @property
    def word_bytes(self):
        return self.data_width // 8

    @property
    def words_per_cycle(self):
        return self.data_rate * self.phy_ratio

    @property
    def burst_cycles(self):
        """Controller cycles of data bus one READ/WRITE occupies."""
        return self.burst_length // (self.data_rate * self.phy_ratio)

    @property
    def burst_bytes(self):
        return self.burst_length * self.word_bytes

    @property
    def row_bytes(self):
        return self.columns * self.word_bytes

    @property
    def capacity_bytes(self):
        return self.banks * self.rows * self.row_bytes

    @property
    def peak_bytes_per_cycle(self):
        return self.word_bytes * self.words_per_cycle

    @property
    def peak_gbps(self):
        """Peak bandwidth in GB/s (10**9 bytes per second)."""
        return self.peak_bytes_per_cycle * self.clock_mhz * 1e6 / 1e9

    @classmethod
    def from_ns(cls, *, clock_mhz, trcd, trp, tras, twr, trfc, trefi, trc=None, trtp=None, trrd=None, **kw):
        """Build from datasheet times. Each time is nanoseconds, or ``(n_ck, ns)`` meaning max(n_ck memory clocks,
        ns). Minimum times round up to whole controller cycles; ``trefi`` (a maximum) rounds down. Everything else
        (``cl``, ``cwl``, turnarounds, geometry, ...) passes through in controller cycles."""
        phy_ratio = kw.get("phy_ratio", 1)
        if not isinstance(clock_mhz, (int, float)) or isinstance(clock_mhz, bool) or not clock_mhz > 0:
            raise ValueError(f"DramTiming.clock_mhz must be a positive number, not {clock_mhz!r}")

        def cyc(name, v):
            nck, ns = v if isinstance(v, tuple) else (0, v)
            if not isinstance(ns, (int, float)) or isinstance(ns, bool) or not ns > 0 or not math.isfinite(ns):
                raise ValueError(f"DramTiming.{name} must be a positive time in ns, not {ns!r}")
            return max(-(-nck // phy_ratio), math.ceil(ns * clock_mhz / 1000 - 1e-9))

        args = dict(trcd=cyc("trcd", trcd), trp=cyc("trp", trp), tras=cyc("tras", tras), twr=cyc("twr", twr),
                    trfc=cyc("trfc", trfc))
        if trc is not None:
            args["trc"] = cyc("trc", trc)
        if trtp is not None:
            args["trtp"] = cyc("trtp", trtp)
        if trrd is not None:
            args["trrd"] = cyc("trrd", trrd)
        if not isinstance(trefi, (int, float)) or isinstance(trefi, bool) or not trefi > 0:
            raise ValueError(f"DramTiming.trefi must be a positive time in ns, not {trefi!r}")
        args["trefi"] = math.floor(trefi * clock_mhz / 1000 + 1e-9)
        return cls(clock_mhz=clock_mhz, **args, **kw)

    def describe(self):
        """One line per parameter: for docs and --help."""
        return "\n".join(f"{f.name} = {getattr(self, f.name)}" for f in fields(self))


# ULX3S: 32 MB of 16-bit SDR SDRAM, IS42S16160J-7 (ISSI) or AS4C16M16SA (Alliance) as fitted. 4 banks x 8192 rows x
# 512 columns x 16 bit. At 100 MHz (10 ns) CAS latency 2 is allowed (both parts' CL2 minimum tCK is <= 10 ns), and
# it is the CAS latency of LiteDRAM's GENSDRPHY. Datasheet (IS42S16160J, -7 grade): tRCD 15 ns, tRP 15 ns, tRAS 42 ns,
# tRC 60 ns, tWR (tDPL) 14 ns, tRRD 14 ns, auto-refresh period tRFC 60 ns, 8192 refreshes per 64 ms (7.8125 us).
# Burst length 1 with one column command per cycle (as LiteDRAM's SDR controller), so any length streams gaplessly.
ULX3S_SDRAM = DramTiming.from_ns(
    name="ulx3s-sdram", data_width=16, clock_mhz=100, burst_length=1, cl=2,
    trcd=15, trp=15, tras=42, trc=60, twr=14, trrd=14, trfc=60, trefi=64e6 / 8192,
    banks=4, rows=8192, columns=512)

# ECPIX-5 (85F): one 16-bit DDR3L device, Micron MT41K256M16TW-107 (4 Gb: 8 banks x 32768 rows x 1024 columns x
# 16 bit, 512 MB; amaranth-boards' ecpix5 has 15 address, 3 bank and 16 DQ pins), behind LiteDRAM's ECP5DDRPHY:
# 1:2, controller 100 MHz, DDR3 clock 200 MHz, 400 MT/s, BL8 = 2 controller cycles per burst. At this clock
# the PHY programs CL 6, CWL 5 memory clocks (3 and 3 controller cycles, rounded up). Datasheet (-107 grade,
# DDR3L-1866): tRCD = tRP = 13.91 ns, tRAS 34 ns, tRC 47.91 ns, tWR 15 ns, tRTP = tWTR = max(4 nCK, 7.5 ns),
# tRRD = max(4 nCK, 10 ns) (2 KB page), tRFC 260 ns (4 Gb), tREFI 7.8 us (<= 85 C). Turnarounds from the JEDEC
# rules in memory clocks, then rounded up: READ->WRITE = CL + tCCD + 2 - CWL = 7 nCK -> 4; WRITE->READ =
# CWL + BL/2 + tWTR = 13 nCK -> 7.
ECPIX5_DDR3 = DramTiming.from_ns(
    name="ecpix5-ddr3", data_width=16, clock_mhz=100, burst_length=8, data_rate=2, phy_ratio=2, cl=3, cwl=3,
    trcd=13.91, trp=13.91, tras=34, trc=47.91, twr=15, trtp=(4, 7.5), trrd=(4, 10), trfc=260, trefi=7800,
    rd_to_wr=4, wr_to_rd=7, banks=8, rows=32768, columns=1024)

#: The DRAM presets by name.
DRAM_PRESETS = {t.name: t for t in (ULX3S_SDRAM, ECPIX5_DDR3)}
