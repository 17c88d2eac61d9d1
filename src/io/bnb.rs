//! bitsandbytes' safetensors serialization of NF4 weights (a `Linear4bit` state dict), read and
//! written bit for bit: for a weight `W`, `W` (packed u8 `[ceil(n/2), 1]`), `W.absmax` (f32, or
//! u8 when double-quantized), `W.quant_map` (f32[16]), `W.nested_absmax` and
//! `W.nested_quant_map` (f32[256]) when double-quantized, and `W.quant_state.bitsandbytes__nf4`
//! (the other fields as UTF-8 JSON in a u8 tensor).


use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::io::safetensors_write::RawTensor;
use crate::quant::nf4::{check_blocksize, dynamic_map, Nf4Stats, Nf4Tensor, NF4_CODE};
use crate::{Error, Result};

/// Suffix of the quant_state tensor that marks `W` as an NF4 weight.
pub const NF4_QUANT_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__nf4";

/// Suffix bitsandbytes uses for FP4 weights (recognized only to say they are unsupported).
const FP4_QUANT_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__fp4";

/// The JSON keys bitsandbytes writes into the quant_state blob (any other key is rejected).
const QUANT_STATE_KEYS: [&str; 7] = [
    "quant_type",
    "blocksize",
    "dtype",
    "shape",
    "nested_blocksize",
    "nested_dtype",
    "nested_offset",
];

/// The non-tensor fields of bitsandbytes' quant state (the JSON blob).
#[derive(Debug, Clone, PartialEq)]
pub struct BnbQuantState {
    /// `"nf4"` (the only type this crate reads).
    pub quant_type: String,
    /// Elements per NF4 block.
    pub blocksize: usize,
    /// torch dtype name of the original weight (`"float32"`, `"float16"`, `"bfloat16"`).
    pub dtype: String,
    /// Shape of the original weight.
    pub shape: Vec<usize>,
    /// Present when the absmax is double-quantized.
    pub nested: Option<BnbNestedState>,
}

/// The double-quantization fields of [`BnbQuantState`].
#[derive(Debug, Clone, PartialEq)]
pub struct BnbNestedState {
    /// NF4 blocks per nested block (`nested_blocksize`, 256 in bitsandbytes).
    pub blocksize: usize,
    /// torch dtype name of the absmax (`nested_dtype`, `"float32"`).
    pub dtype: String,
    /// `nested_offset`: the f32 offset widened to a double (Python float).
    pub offset: f64,
}

impl BnbQuantState {
    /// Parses the quant_state JSON `bytes` of tensor `tensor` in file `file`: an object with
    /// exactly the keys quant_type (string), blocksize (int), dtype (string), shape (int list) and,
    /// all or none, nested_blocksize (int), nested_dtype (string), nested_offset (number).
    /// Only checks types and presence; errors are `Error::Format` naming the file and tensor.
    pub fn parse(file: &str, tensor: &str, bytes: &[u8]) -> Result<Self> {
        let err = |what: String| Error::format(file, format!("tensor `{tensor}`: {what}"));
        let text = std::str::from_utf8(bytes).map_err(|e| err(format!("not UTF-8 JSON ({e})")))?;
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| err(format!("invalid JSON ({e})")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| err("JSON is not an object".into()))?;
        if let Some(k) = obj.keys().find(|k| !QUANT_STATE_KEYS.contains(&k.as_str())) {
            return Err(err(format!("unknown quant_state field `{k}`")));
        }
        let field = |k: &str| {
            obj.get(k)
                .ok_or_else(|| err(format!("missing field `{k}`")))
        };
        let string = |k: &str| -> Result<String> {
            field(k)?
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| err(format!("field `{k}` is not a string")))
        };
        let uint = |k: &str| -> Result<usize> {
            field(k)?
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| err(format!("field `{k}` is not a non-negative integer")))
        };
        let shape = field("shape")?
            .as_array()
            .ok_or_else(|| err("field `shape` is not a list".into()))?
            .iter()
            .map(|d| d.as_u64().and_then(|v| usize::try_from(v).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| err("field `shape` is not a list of non-negative integers".into()))?;
        let n_nested = ["nested_blocksize", "nested_dtype", "nested_offset"]
            .iter()
            .filter(|k| obj.contains_key(**k))
            .count();
        let nested = match n_nested {
            0 => None,
            3 => {
                let offset = field("nested_offset")?
                    .as_f64()
                    .ok_or_else(|| err("field `nested_offset` is not a number".into()))?;
                Some(BnbNestedState {
                    blocksize: uint("nested_blocksize")?,
                    dtype: string("nested_dtype")?,
                    offset,
                })
            }
            _ => {
                let missing = ["nested_blocksize", "nested_dtype", "nested_offset"]
                    .into_iter()
                    .find(|k| !obj.contains_key(*k))
                    .unwrap_or("nested_*");
                return Err(err(format!(
                    "missing field `{missing}` (other nested fields present)"
                )));
            }
        };
        Ok(BnbQuantState {
            quant_type: string("quant_type")?,
            blocksize: uint("blocksize")?,
            dtype: string("dtype")?,
            shape,
            nested,
        })
    }

    /// The JSON blob exactly as bitsandbytes writes it (Python `json.dumps`: `", "` and `": "`
    /// separators, keys in bitsandbytes' order, floats in Python `repr` form).
    pub fn to_json(&self) -> String {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        let mut s = format!(
            "{{\"quant_type\": {}, \"blocksize\": {}, \"dtype\": {}, \"shape\": [{}]",
            json_string(&self.quant_type),
            self.blocksize,
            json_string(&self.dtype),
            shape.join(", ")
        );
        if let Some(nested) = &self.nested {
            s.push_str(&format!(
                ", \"nested_blocksize\": {}, \"nested_dtype\": {}, \"nested_offset\": {}",
                nested.blocksize,
                json_string(&nested.dtype),
                python_float_repr(nested.offset)
            ));
        }
        s.push('}');
        s
    }

    /// The quant state of `t` as bitsandbytes writes it for an f32 weight: quant_type "nf4",
    /// dtype "float32", nested_dtype "float32", nested_offset = the f32 offset as a double.
    pub fn of(t: &Nf4Tensor) -> Self {
        let nested = match &t.stats {
            Nf4Stats::Absmax(_) => None,
            Nf4Stats::DoubleQuant {
                offset,
                nested_blocksize,
                ..
            } => Some(BnbNestedState {
                blocksize: *nested_blocksize,
                dtype: "float32".into(),
                offset: f64::from(*offset),
            }),
        };
        BnbQuantState {
            quant_type: "nf4".into(),
            blocksize: t.blocksize,
            dtype: "float32".into(),
            shape: t.shape.clone(),
            nested,
        }
    }
}

/// A JSON string literal (ASCII names only in practice; serde_json escaping).
fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// Python's `repr(float)`: the shortest round-trip digits, positional when the decimal exponent
/// is in -4..16 (always with a fractional part), else `d.ddde-XX` with at least two exponent
/// digits. Non-finite values give `NaN` / `Infinity` / `-Infinity` as `json.dumps` does.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // `{:e}` gives the shortest round-trip digits: "-d.ddde-X".
    let sci = format!("{x:e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let neg = mant.starts_with('-');
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if neg { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else {
            let point = point as usize;
            if digits.len() <= point {
                format!("{}{}.0", digits, "0".repeat(point - digits.len()))
            } else {
                format!("{}.{}", &digits[..point], &digits[point..])
            }
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits.clone()
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}

/// Names `W` of the NF4 weights in a safetensors file: every `W` with a tensor
/// `W.quant_state.bitsandbytes__nf4`, sorted.
pub fn bnb_weight_names(tensors: &SafeTensors) -> Vec<String> {
    let mut names: Vec<String> = tensors
        .names()
        .into_iter()
        .filter_map(|n| n.strip_suffix(NF4_QUANT_STATE_SUFFIX).map(str::to_owned))
        .collect();
    names.sort();
    names
}

fn get<'a>(file: &str, tensors: &SafeTensors<'a>, name: &str) -> Result<TensorView<'a>> {
    tensors
        .tensor(name)
        .map_err(|_| Error::format(file, format!("missing tensor `{name}`")))
}

fn expect_layout(
    file: &str,
    name: &str,
    view: &TensorView<'_>,
    dtype: Dtype,
    shape: &[usize],
) -> Result<()> {
    if view.dtype() != dtype {
        return Err(Error::format(
            file,
            format!(
                "tensor `{name}`: dtype {:?}, expected {dtype:?}",
                view.dtype()
            ),
        ));
    }
    if view.shape() != shape {
        return Err(Error::format(
            file,
            format!(
                "tensor `{name}`: shape {:?}, expected {shape:?}",
                view.shape()
            ),
        ));
    }
    let bytes = shape
        .iter()
        .try_fold(dtype.bitsize(), |a, &d| a.checked_mul(d))
        .map(|bits| bits / 8);
    if bytes != Some(view.data().len()) {
        let bytes = bytes.map_or("too many".to_owned(), |b| b.to_string());
        return Err(Error::format(
            file,
            format!(
                "tensor `{name}`: {} data bytes, expected {bytes}",
                view.data().len()
            ),
        ));
    }
    Ok(())
}

fn f32s_le(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn f32s_to_le(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn finite_f32s(file: &str, name: &str, view: &TensorView<'_>) -> Result<Vec<f32>> {
    let v = f32s_le(view.data());
    if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(Error::format(
            file,
            format!("tensor `{name}`: element {i} is {x}"),
        ));
    }
    Ok(v)
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Reads the NF4 weight `weight` from `tensors` (a safetensors file named `file_name` in errors)
/// in bitsandbytes' layout, validating everything first: the quant_state JSON (quant_type "nf4",
/// blocksize a power of two in 32..=4096, dtype float32/float16/bfloat16, shape with n >= 1
/// elements), `W` u8 `[ceil(n/2), 1]`, `W.absmax` f32 `[nblocks]` (u8 when nested),
/// `W.quant_map` f32[16] equal to [`NF4_CODE`], and when nested: nested_dtype "float32",
/// `W.nested_absmax` f32 `[ceil(nblocks/nested_blocksize)]`, `W.nested_quant_map` f32[256]
/// equal to [`dynamic_map`], finite nested_offset (rounded to f32 as torch does). Errors are
/// `Error::Format` naming the file and the tensor.
pub fn read_bnb_nf4(file_name: &str, tensors: &SafeTensors, weight: &str) -> Result<Nf4Tensor> {
    let file = file_name;
    let qs_name = format!("{weight}{NF4_QUANT_STATE_SUFFIX}");
    let qs_view = match tensors.tensor(&qs_name) {
        Ok(v) => v,
        Err(_) => {
            let fp4 = format!("{weight}{FP4_QUANT_STATE_SUFFIX}");
            return Err(if tensors.tensor(&fp4).is_ok() {
                Error::format(
                    file,
                    format!("weight `{weight}` is FP4-quantized (`{fp4}`); only NF4 is supported"),
                )
            } else {
                Error::format(
                    file,
                    format!(
                        "missing tensor `{qs_name}`: `{weight}` is not a bitsandbytes NF4 weight"
                    ),
                )
            });
        }
    };
    if qs_view.dtype() != Dtype::U8 || qs_view.shape().len() != 1 {
        return Err(Error::format(
            file,
            format!(
                "tensor `{qs_name}`: dtype {:?} shape {:?}, expected a 1-D U8 tensor of JSON",
                qs_view.dtype(),
                qs_view.shape()
            ),
        ));
    }
    let qs = BnbQuantState::parse(file, &qs_name, qs_view.data())?;
    let qs_err = |what: String| Error::format(file, format!("tensor `{qs_name}`: {what}"));
    if qs.quant_type != "nf4" {
        return Err(qs_err(format!(
            "quant_type {:?}, expected \"nf4\"",
            qs.quant_type
        )));
    }
    check_blocksize(qs.blocksize).map_err(|_| {
        qs_err(format!(
            "blocksize {} is not a power of two in 32..=4096",
            qs.blocksize
        ))
    })?;
    if !["float32", "float16", "bfloat16"].contains(&qs.dtype.as_str()) {
        return Err(qs_err(format!(
            "dtype {:?} is not float32, float16 or bfloat16",
            qs.dtype
        )));
    }
    let n = qs
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| qs_err(format!("shape {:?} overflows", qs.shape)))?;
    if n == 0 {
        return Err(qs_err(format!("shape {:?} has no elements", qs.shape)));
    }
    let nblocks = n.div_ceil(qs.blocksize);

    let packed_view = get(file, tensors, weight)?;
    expect_layout(file, weight, &packed_view, Dtype::U8, &[n.div_ceil(2), 1])?;

    let qmap_name = format!("{weight}.quant_map");
    let qmap_view = get(file, tensors, &qmap_name)?;
    expect_layout(file, &qmap_name, &qmap_view, Dtype::F32, &[16])?;
    if !same_bits(&f32s_le(qmap_view.data()), &NF4_CODE) {
        return Err(Error::format(
            file,
            format!("tensor `{qmap_name}`: not the NF4 code table (custom maps are not supported)"),
        ));
    }

    let absmax_name = format!("{weight}.absmax");
    let nested_absmax_name = format!("{weight}.nested_absmax");
    let nested_map_name = format!("{weight}.nested_quant_map");
    let absmax_view = get(file, tensors, &absmax_name)?;
    let stats = match &qs.nested {
        None => {
            for extra in [&nested_absmax_name, &nested_map_name] {
                if tensors.tensor(extra).is_ok() {
                    return Err(Error::format(
                        file,
                        format!("tensor `{extra}` present but `{qs_name}` has no nested fields"),
                    ));
                }
            }
            expect_layout(file, &absmax_name, &absmax_view, Dtype::F32, &[nblocks])?;
            Nf4Stats::Absmax(finite_f32s(file, &absmax_name, &absmax_view)?)
        }
        Some(nested) => {
            if nested.dtype != "float32" {
                return Err(qs_err(format!(
                    "nested_dtype {:?}, expected \"float32\"",
                    nested.dtype
                )));
            }
            check_blocksize(nested.blocksize).map_err(|_| {
                qs_err(format!(
                    "nested_blocksize {} is not a power of two in 32..=4096",
                    nested.blocksize
                ))
            })?;
            if !nested.offset.is_finite() || !(nested.offset as f32).is_finite() {
                return Err(qs_err(format!(
                    "nested_offset {} is not a finite f32",
                    nested.offset
                )));
            }
            expect_layout(file, &absmax_name, &absmax_view, Dtype::U8, &[nblocks])?;
            let na_view = get(file, tensors, &nested_absmax_name)?;
            let nn = nblocks.div_ceil(nested.blocksize);
            expect_layout(file, &nested_absmax_name, &na_view, Dtype::F32, &[nn])?;
            let nm_view = get(file, tensors, &nested_map_name)?;
            expect_layout(file, &nested_map_name, &nm_view, Dtype::F32, &[256])?;
            if !same_bits(&f32s_le(nm_view.data()), &dynamic_map()) {
                return Err(Error::format(
                    file,
                    format!(
                        "tensor `{nested_map_name}`: not bitsandbytes' dynamic map \
                         (custom maps are not supported)"
                    ),
                ));
            }
            Nf4Stats::DoubleQuant {
                absmax_u8: absmax_view.data().to_vec(),
                nested_absmax: finite_f32s(file, &nested_absmax_name, &na_view)?,
                offset: nested.offset as f32,
                nested_blocksize: nested.blocksize,
            }
        }
    };
    let t = Nf4Tensor {
        shape: qs.shape,
        blocksize: qs.blocksize,
        packed: packed_view.data().to_vec(),
        stats,
    };
    t.validate()
        .map_err(|e| Error::format(file, format!("weight `{weight}`: {e}")))?;
    Ok(t)
}

/// Reads every NF4 weight of the safetensors file at `path` (see [`read_all_bnb_nf4`]); an
/// unreadable or malformed file is an `Error::Format` naming it.
pub fn read_bnb_nf4_file(path: &std::path::Path) -> Result<Vec<(String, Nf4Tensor)>> {
    let file = path.display().to_string();
    let bytes = crate::io::files::read_regular(path)?;
    let tensors = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(&file, format!("not a valid safetensors file: {e}")))?;
    read_all_bnb_nf4(&file, &tensors)
}

/// Reads every NF4 weight of a file: `(W, tensor)` for each name of [`bnb_weight_names`].
pub fn read_all_bnb_nf4(
    file_name: &str,
    tensors: &SafeTensors,
) -> Result<Vec<(String, Nf4Tensor)>> {
    bnb_weight_names(tensors)
        .into_iter()
        .map(|w| read_bnb_nf4(file_name, tensors, &w).map(|t| (w, t)))
        .collect()
}

/// Appends the bitsandbytes tensors of weight `weight` to `out`: `W` u8 `[ceil(n/2), 1]`,
/// `W.absmax` (f32 `[nblocks]`, or u8 `[nblocks]` with `W.nested_absmax` f32
/// `[ceil(nblocks/256)]` and `W.nested_quant_map` f32[256]), `W.quant_map` f32[16], and
/// `W.quant_state.bitsandbytes__nf4` (u8 JSON, [`BnbQuantState::of`]). `Error::Invalid` if `t`
/// fails [`Nf4Tensor::validate`].
pub fn write_bnb_nf4(weight: &str, t: &Nf4Tensor, out: &mut Vec<RawTensor>) -> Result<()> {
    t.validate()?;
    let n = t.numel();
    let nb = t.nblocks();
    out.push(RawTensor {
        name: weight.to_owned(),
        dtype: Dtype::U8,
        shape: vec![n.div_ceil(2), 1],
        data: t.packed.clone(),
    });
    match &t.stats {
        Nf4Stats::Absmax(a) => out.push(RawTensor {
            name: format!("{weight}.absmax"),
            dtype: Dtype::F32,
            shape: vec![nb],
            data: f32s_to_le(a),
        }),
        Nf4Stats::DoubleQuant {
            absmax_u8,
            nested_absmax,
            ..
        } => {
            out.push(RawTensor {
                name: format!("{weight}.absmax"),
                dtype: Dtype::U8,
                shape: vec![nb],
                data: absmax_u8.clone(),
            });
            out.push(RawTensor {
                name: format!("{weight}.nested_absmax"),
                dtype: Dtype::F32,
                shape: vec![nested_absmax.len()],
                data: f32s_to_le(nested_absmax),
            });
            out.push(RawTensor {
                name: format!("{weight}.nested_quant_map"),
                dtype: Dtype::F32,
                shape: vec![256],
                data: f32s_to_le(&dynamic_map()),
            });
        }
    }
    out.push(RawTensor {
        name: format!("{weight}.quant_map"),
        dtype: Dtype::F32,
        shape: vec![16],
        data: f32s_to_le(&NF4_CODE),
    });
    let json = BnbQuantState::of(t).to_json().into_bytes();
    out.push(RawTensor {
        name: format!("{weight}{NF4_QUANT_STATE_SUFFIX}"),
        dtype: Dtype::U8,
        shape: vec![json.len()],
        data: json,
    });
    Ok(())
}

