//! Fixed-point arithmetic of the exact plan: the one rounding rule, requantization, and turning
//! float inputs into integers without evaluating any floating-point operation.
//!
//! **The rounding rule.** Every rescaling in a plan computes `floor(x * m / 2^shift + 1/2)`: the
//! exact product, then an arithmetic shift right with half added first, so ties round toward
//! positive infinity. Integer division rounds the same way (`floor(n / d + 1/2)` for `d > 0`).

/// Activations are signed 16-bit values, symmetric around zero: `[-ACTIVATION_MAX, ACTIVATION_MAX]`.
pub const ACTIVATION_MAX: i64 = 32767;

/// Weights are signed 8-bit values, symmetric around zero: `[-WEIGHT_MAX, WEIGHT_MAX]`.
pub const WEIGHT_MAX: i32 = 127;

/// A positive real factor as an integer multiplier and a right shift: `m / 2^shift`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Multiplier {
    /// In `[2^30, 2^31)` for a normal factor; `0` for a factor too small to matter.
    pub m: i64,
    /// Right shift, at most [`Multiplier::MAX_SHIFT`].
    pub shift: u32,
}

impl Multiplier {
    /// The largest shift a plan may carry.
    pub const MAX_SHIFT: u32 = 96;

    /// The nearest multiplier to `factor` (plan building only, where floats are allowed).
    ///
    /// `frexp` and one multiplication by a power of two are exact, and `round` is correctly
    /// rounded, so the same factor gives the same multiplier on every machine.
    pub fn from_f64(factor: f64) -> Self {
        if !(factor.is_finite() && factor > 0.0) {
            return Self { m: 0, shift: 0 };
        }
        let (fraction, exponent) = libm::frexp(factor);
        // factor = fraction * 2^exponent with fraction in [0.5, 1): m = fraction * 2^31.
        let mut m = (fraction * (1u64 << 31) as f64).round() as i64;
        let mut shift = 31 - exponent;
        if m == 1 << 31 {
            m >>= 1;
            shift -= 1;
        }
        if shift > Self::MAX_SHIFT as i32 {
            return Self { m: 0, shift: 0 };
        }
        if shift < 0 {
            // A factor of 2^31 or more saturates every non-zero input anyway.
            return Self {
                m: i64::from(i32::MAX),
                shift: 0,
            };
        }
        Self { m, shift: shift as u32 }
    }

    /// The factor this multiplier stands for (for reports and tests, never while executing).
    pub fn to_f64(self) -> f64 {
        self.m as f64 / (self.shift as f64).exp2()
    }

    /// `floor(x * m / 2^shift + 1/2)`, exactly.
    #[inline]
    pub fn apply(self, x: i64) -> i64 {
        // The common case in 64 bits: with |x| and |m| at most 2^31 the product stays within 2^62
        // and the rounding half within 2^61, so nothing overflows and the value is the same.
        if let (Ok(x), Ok(m)) = (i32::try_from(x), i32::try_from(self.m))
            && self.shift < 63
        {
            let product = i64::from(x) * i64::from(m);
            return if self.shift == 0 {
                product
            } else {
                (product + (1i64 << (self.shift - 1))) >> self.shift
            };
        }
        let product = i128::from(x) * i128::from(self.m);
        if self.shift == 0 {
            return clamp_i128(product);
        }
        clamp_i128((product + (1i128 << (self.shift - 1))) >> self.shift)
    }
}

#[inline]
fn clamp_i128(x: i128) -> i64 {
    x.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// Clamps to the activation range.
#[inline]
pub fn saturate(x: i64) -> i32 {
    x.clamp(-ACTIVATION_MAX, ACTIVATION_MAX) as i32
}

/// `floor(n / d + 1/2)` for `d > 0`: integer division under the plan's rounding rule.
#[inline]
pub fn div_round(n: i64, d: i64) -> i64 {
    debug_assert!(d > 0);
    if let (Some(twice_n), Some(twice_d)) = (n.checked_mul(2), d.checked_mul(2))
        && let Some(numerator) = twice_n.checked_add(d)
    {
        // The same floor in 64 bits; a power-of-two divisor (a 2x2 average) is a shift.
        return if twice_d.count_ones() == 1 {
            numerator >> twice_d.trailing_zeros()
        } else {
            numerator.div_euclid(twice_d)
        };
    }
    // floor((2n + d) / 2d), with Euclidean division giving the floor for a positive divisor.
    (2 * i128::from(n) + i128::from(d)).div_euclid(2 * i128::from(d)) as i64
}

/// Quantizes a float32 input value: `floor(x * m / 2^shift + 1/2)`, saturated to the activation
/// range, computed from the IEEE-754 bits with integers only.
///
/// `x = mantissa * 2^(exponent - 150)` exactly for every finite float32, so the product with the
/// multiplier is an exact integer times a power of two, and the shift applies the rounding rule.
/// Infinities saturate. NaN has no integer value; callers refuse it before quantizing.
pub fn quantize_f32_bits(bits: u32, inverse_scale: Multiplier) -> i32 {
    let negative = bits >> 31 == 1;
    let raw_exponent = ((bits >> 23) & 0xff) as i64;
    let raw_mantissa = i128::from(bits & 0x7f_ffff);
    if raw_exponent == 0xff {
        return if negative {
            -ACTIVATION_MAX as i32
        } else {
            ACTIVATION_MAX as i32
        };
    }
    // Subnormals have exponent 1 and no implicit leading bit.
    let (mantissa, exponent) = if raw_exponent == 0 {
        (raw_mantissa, 1)
    } else {
        (raw_mantissa | (1 << 23), raw_exponent)
    };
    let signed = if negative { -mantissa } else { mantissa };
    // value = product * 2^(exponent - 150 - shift)
    let right = 150 + i64::from(inverse_scale.shift) - exponent;
    if let Ok(m) = i32::try_from(inverse_scale.m)
        && (1..63).contains(&right)
    {
        // The common case in 64 bits: |mantissa * m| < 2^55, so the rounding add cannot overflow.
        let product = signed as i64 * i64::from(m);
        let scaled = (product + (1i64 << (right - 1))) >> right;
        return scaled.clamp(-ACTIVATION_MAX, ACTIVATION_MAX) as i32;
    }
    let product = signed * i128::from(inverse_scale.m);
    let scaled = if right <= 0 {
        // A left shift of more than ~40 bits saturates anyway.
        if right < -40 {
            if product == 0 {
                0
            } else {
                product.signum() * i128::from(i64::MAX)
            }
        } else {
            product << (-right)
        }
    } else if right >= 120 {
        // |product| < 2^55, so the value rounds to 0 (a tie is impossible at this distance).
        0
    } else {
        (product + (1i128 << (right - 1))) >> right
    };
    scaled.clamp(-i128::from(ACTIVATION_MAX), i128::from(ACTIVATION_MAX)) as i32
}

/// Quantizes float32 inputs as [`quantize_f32_bits`] does, to the same integers, with no branch
/// per value so that the loop vectorizes (with AVX-512 where the CPU has it). NaN must have been
/// refused before.
///
/// For a multiplier that fits in 32 bits, one formula covers every value: with `|m| < 2^31` and
/// a mantissa below `2^24`, `|product| < 2^55`. A right shift of 56 to 62 bits already rounds
/// every such product to 0, as a longer one does; and a left shift (`right <= 0`, a value of at
/// least `2^23 * |m|` units) saturates, as a shift right by 1 of a product of at least `2^23`
/// does. So the shift is clamped to `[1, 62]`, and only infinities are chosen apart.
pub fn quantize_f32_slice(values: &[f32], inverse_scale: Multiplier) -> Vec<i32> {
    let Ok(m) = i32::try_from(inverse_scale.m) else {
        return values
            .iter()
            .map(|x| quantize_f32_bits(x.to_bits(), inverse_scale))
            .collect();
    };
    let mut out = vec![0i32; values.len()];
    let shift = i64::from(inverse_scale.shift);
    #[cfg(target_arch = "x86_64")]
    if let Some(v4) = pulp::x86::V4::try_new() {
        v4.vectorize(QuantizeRun {
            values,
            m,
            shift,
            out: &mut out,
        });
        return out;
    }
    quantize_run(values, m, shift, &mut out);
    out
}

/// [`quantize_run`] inside a `pulp` instruction-set context.
struct QuantizeRun<'a> {
    values: &'a [f32],
    m: i32,
    shift: i64,
    out: &'a mut [i32],
}

impl pulp::NullaryFnOnce for QuantizeRun<'_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        quantize_run(self.values, self.m, self.shift, self.out);
    }
}

/// The loop of [`quantize_f32_slice`], for a multiplier `m / 2^shift` with `m` in 32 bits.
#[inline(always)]
fn quantize_run(values: &[f32], m: i32, shift: i64, out: &mut [i32]) {
    for (q, x) in out.iter_mut().zip(values) {
        let bits = x.to_bits();
        let raw_exponent = i64::from((bits >> 23) & 0xff);
        let implicit = if raw_exponent == 0 { 0 } else { 1 << 23 };
        let mantissa = i64::from(bits & 0x7f_ffff) | implicit;
        let negative = bits >> 31 == 1;
        let signed = if negative { -mantissa } else { mantissa };
        let right = (150 + shift - raw_exponent.max(1)).clamp(1, 62);
        let scaled = (signed * i64::from(m) + (1i64 << (right - 1))) >> right;
        let finite = scaled.clamp(-ACTIVATION_MAX, ACTIVATION_MAX) as i32;
        let infinite = if negative { -ACTIVATION_MAX } else { ACTIVATION_MAX } as i32;
        *q = if raw_exponent == 0xff { infinite } else { finite };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rounds_ties_toward_positive_infinity() {
        let half = Multiplier { m: 1, shift: 1 };
        assert_eq!(half.apply(1), 1); // 0.5 -> 1
        assert_eq!(half.apply(-1), 0); // -0.5 -> 0
        assert_eq!(half.apply(3), 2); // 1.5 -> 2
        assert_eq!(half.apply(-3), -1); // -1.5 -> -1
        assert_eq!(div_round(7, 2), 4);
        assert_eq!(div_round(-7, 2), -3);
        assert_eq!(div_round(-8, 3), -3);
    }

    proptest! {
        #[test]
        fn rounded_division_matches_the_wide_formula(
            n in prop_oneof![any::<i64>(), -100_000i64..100_000],
            d in prop_oneof![1i64..=i64::MAX, 1i64..40, (0u32..62).prop_map(|e| 1i64 << e)],
        ) {
            let wide = (2 * i128::from(n) + i128::from(d)).div_euclid(2 * i128::from(d)) as i64;
            prop_assert_eq!(div_round(n, d), wide);
        }
    }

    #[test]
    fn multiplier_is_close_to_its_factor() {
        for factor in [1.0, 0.5, 3.0e-7, 0.999_999, 1234.5, 1.0e-18] {
            let multiplier = Multiplier::from_f64(factor);
            assert!(
                (multiplier.to_f64() / factor - 1.0).abs() < 1e-9,
                "{factor}: {multiplier:?}"
            );
        }
        assert_eq!(Multiplier::from_f64(0.0).m, 0);
        assert_eq!(Multiplier::from_f64(1e-40).m, 0);
    }

    proptest! {
        #[test]
        fn quantizing_bits_matches_exact_rational_rounding(x in -1.0e4f32..1.0e4f32, factor in 1.0e-3f64..1.0e4f64) {
            let inverse_scale = Multiplier::from_f64(factor);
            let q = quantize_f32_bits(x.to_bits(), inverse_scale);
            // Reference in f64, exact here: x has 24 significant bits and m 31, so x * m fits in 53 bits
            // only approximately; compare within one unit, then check the exact tie rule separately.
            let reference = (f64::from(x) * inverse_scale.to_f64()).clamp(-32767.0, 32767.0);
            prop_assert!((f64::from(q) - reference).abs() <= 0.5 + 1e-6, "x={x} q={q} reference={reference}");
        }
    }

    /// The formula the fast paths must equal, in 128 bits throughout.
    fn apply_wide(multiplier: Multiplier, x: i64) -> i64 {
        let product = i128::from(x) * i128::from(multiplier.m);
        let rounded = if multiplier.shift == 0 {
            product
        } else {
            (product + (1i128 << (multiplier.shift - 1))) >> multiplier.shift
        };
        clamp_i128(rounded)
    }

    proptest! {
        #[test]
        fn applying_a_multiplier_matches_the_wide_formula(
            x in prop_oneof![any::<i64>(), -(1i64 << 31)..=(1i64 << 31), -70_000i64..70_000],
            m in prop_oneof![any::<i64>(), 0i64..(1 << 31), -(1i64 << 31)..=(1i64 << 31)],
            shift in 0u32..=Multiplier::MAX_SHIFT,
        ) {
            let multiplier = Multiplier { m, shift };
            prop_assert_eq!(multiplier.apply(x), apply_wide(multiplier, x));
        }

        #[test]
        fn quantizing_agrees_with_the_wide_formula_on_any_bits(bits in any::<u32>(), m in 0i64..(1 << 31), shift in 0u32..=Multiplier::MAX_SHIFT) {
            let inverse_scale = Multiplier { m, shift };
            let x = f32::from_bits(bits);
            prop_assume!(!x.is_nan());
            prop_assert_eq!(quantize_f32_bits(bits, inverse_scale), quantize_wide(bits, inverse_scale));
        }
    }

    proptest! {
        #[test]
        fn quantizing_a_slice_gives_each_value_s_integer(
            bits in proptest::collection::vec(prop_oneof![any::<u32>(), (0u32..2).prop_map(|s| s << 31 | 0x7f80_0000)], 1..40),
            m in prop_oneof![any::<i64>(), i64::from(i32::MIN)..=i64::from(i32::MAX), (1i64 << 30)..(1 << 31)],
            shift in 0u32..=Multiplier::MAX_SHIFT,
        ) {
            let inverse_scale = Multiplier { m, shift };
            let values: Vec<f32> = bits.iter().map(|b| f32::from_bits(*b)).filter(|x| !x.is_nan()).collect();
            let one_by_one: Vec<i32> = values.iter().map(|x| quantize_f32_bits(x.to_bits(), inverse_scale)).collect();
            prop_assert_eq!(quantize_f32_slice(&values, inverse_scale), one_by_one);
        }
    }

    /// Quantization in 128 bits throughout, from the float's exact value as a fraction.
    fn quantize_wide(bits: u32, inverse_scale: Multiplier) -> i32 {
        let x = f32::from_bits(bits);
        if x.is_infinite() {
            return if x < 0.0 { -32767 } else { 32767 };
        }
        let raw_exponent = i64::from((bits >> 23) & 0xff);
        let mantissa = i128::from(bits & 0x7f_ffff) | if raw_exponent == 0 { 0 } else { 1 << 23 };
        let signed = if bits >> 31 == 1 { -mantissa } else { mantissa };
        let right = 150 + i64::from(inverse_scale.shift) - raw_exponent.max(1);
        let product = signed * i128::from(inverse_scale.m);
        let scaled = if right <= 0 {
            // |product| < 2^55 and a left shift of up to 2^8: saturate through a checked shift.
            product
                .checked_mul(1i128 << (-right).min(70))
                .unwrap_or(product.signum() * i128::MAX)
        } else if right >= 127 {
            // |product| < 2^55: far below one half.
            0
        } else {
            (product + (1i128 << (right - 1))) >> right
        };
        scaled.clamp(-32767, 32767) as i32
    }

    #[test]
    fn quantizing_handles_the_edges() {
        let one = Multiplier::from_f64(1.0);
        assert_eq!(quantize_f32_bits(2.5f32.to_bits(), one), 3);
        assert_eq!(quantize_f32_bits((-2.5f32).to_bits(), one), -2);
        assert_eq!(quantize_f32_bits(f32::INFINITY.to_bits(), one), 32767);
        assert_eq!(quantize_f32_bits(f32::NEG_INFINITY.to_bits(), one), -32767);
        assert_eq!(quantize_f32_bits(1.0e30f32.to_bits(), one), 32767);
        assert_eq!(quantize_f32_bits(1.0e-45f32.to_bits(), one), 0);
        assert_eq!(quantize_f32_bits((-0.0f32).to_bits(), one), 0);
    }
}
