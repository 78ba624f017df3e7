//! Runs a plan on blocks of batch rows, one thread per block, when no instruction mixes rows.
//!
//! Handing work to other threads once per instruction costs more than the small layers of a
//! batch of images take, so a batch is instead cut once: every thread (the caller's and those
//! of a polling pool, see the `pools` module) runs the whole plan on its own rows, and the
//! blocks' values are joined afterwards. This gives the values of an undivided run exactly, provided
//! every instruction computes each row of a batched value from the same row of its batched
//! operands and from values that are the same for every row. That is checked in two steps:
//! - [`row_kinds`] reads the plan before anything runs and declines instructions that reduce,
//!   move or index along the row axis;
//! - [`keeps_rows`] checks each batched result's shape as it is computed, for what depends on
//!   ranks (broadcasting, products over the last axis).
//!
//! A block that fails either check, or any instruction error in a block, makes the caller run
//! the plan undivided, which then reports its own errors. Plans that build row indices (such as
//! all-MiniLM-L6-v2's attention mask, gathered with `Range(0, batch)`) run undivided, their large
//! products shared between threads instead.

use std::ops::Range;

use super::{ExecOptions, ITensor, run_instr};
use crate::plan::{Instr, Plan, PlanDim};
use crate::pools::{BLOCK_WORTHY_PRODUCTS, Rows, row_blocks, run_polling};

/// Runs the instructions of `plan` on blocks of rows of its bound `inputs` when the plan allows
/// it and the work is worth the threads; returns the instructions' values (not the inputs), or
/// `None` for the caller to run it undivided.
pub(super) fn run_in_row_blocks(plan: &Plan, inputs: &[ITensor], options: &ExecOptions) -> Option<Vec<ITensor>> {
    run_in_row_blocks_above(plan, inputs, options, BLOCK_WORTHY_PRODUCTS)
}

fn run_in_row_blocks_above(
    plan: &Plan,
    inputs: &[ITensor],
    options: &ExecOptions,
    min_products: usize,
) -> Option<Vec<ITensor>> {
    if options.threads < 2 || inputs.len() != plan.inputs.len() {
        return None;
    }
    let kinds = row_kinds(plan)?;
    let first_batched = kinds.iter().position(|k| *k == Rows::Batched)?;
    let rows = *inputs[first_batched].shape.first()?;
    let elements_per_row: usize = inputs
        .iter()
        .zip(&kinds)
        .filter(|(_, kind)| **kind == Rows::Batched)
        .map(|(x, _)| x.data.len() / rows.max(1))
        .sum();
    let bounds = row_blocks(
        rows,
        options.threads,
        products_per_row(plan, elements_per_row),
        min_products,
    )?;
    let block_options = ExecOptions {
        threads: (options.threads / bounds.len()).max(1),
        ..*options
    };
    let run = |range: &Range<usize>| run_block(plan, inputs, &kinds, range.clone(), &block_options);
    let tasks: Vec<_> = bounds.iter().map(|range| move || run(range)).collect();
    let results = run_polling(tasks);
    let blocks: Vec<Vec<ITensor>> = results.into_iter().collect::<Option<_>>()?;
    join_blocks(blocks, &kinds[inputs.len()..], options)
}

/// Whether each value of the plan (inputs, then instructions) is batched or shared, or `None`
/// when some instruction mixes rows. Inputs whose first dimension is the first input's batch
/// symbol are batched.
fn row_kinds(plan: &Plan) -> Option<Vec<Rows>> {
    let batch_symbol = plan.inputs.iter().find_map(|input| match input.shape.first() {
        Some(PlanDim::Symbol(symbol)) => Some(symbol),
        _ => None,
    })?;
    let mut kinds: Vec<Rows> = plan
        .inputs
        .iter()
        .map(|input| match input.shape.first() {
            Some(PlanDim::Symbol(symbol)) if symbol == batch_symbol => Rows::Batched,
            _ => Rows::Shared,
        })
        .collect();
    for instr in &plan.instrs {
        let operands: Vec<Rows> = instr
            .inputs()
            .iter()
            .map(|v| kinds.get(*v as usize).copied())
            .collect::<Option<_>>()?;
        kinds.push(row_kind(instr, &operands)?);
    }
    Some(kinds)
}

/// The kind of an instruction's value from its operands' kinds, or `None` when the instruction
/// reads or moves across rows.
fn row_kind(instr: &Instr, operands: &[Rows]) -> Option<Rows> {
    use Rows::{Batched, Shared};
    if operands.iter().all(|k| *k == Shared) {
        return Some(Shared);
    }
    let keeps_rows = match instr {
        Instr::Dense { .. }
        | Instr::Clamp { .. }
        | Instr::Lookup { .. }
        | Instr::Rescale { .. }
        | Instr::Conv { .. }
        | Instr::MaxPool { .. }
        | Instr::AvgPool { .. }
        | Instr::Embedding { .. }
        | Instr::AddSub { .. }
        | Instr::Mul { .. }
        | Instr::Compare { .. }
        | Instr::Logic { .. }
        | Instr::Where { .. }
        | Instr::MatMul { .. } => true,
        Instr::Softmax { axis, .. }
        | Instr::RmsNorm { axis, .. }
        | Instr::AddAxis { axis, .. }
        | Instr::RemoveAxis { axis, .. } => *axis != 0,
        Instr::MoveAxis { from, to, .. } => *from != 0 && *to != 0,
        // From the first axis, only with the first new dimension inferred: with the check that
        // it comes out as the block's rows, each row then keeps its own elements.
        Instr::Reshape { at, to, .. } => *at != 0 || to.first() == Some(&0),
        Instr::ReduceSum { axes, .. } | Instr::ReduceMinMax { axes, .. } => !axes.contains(&0),
        // The size of another axis is the same in every block; the row count is not.
        Instr::Dim { axis, .. } => return (*axis != 0).then_some(Shared),
        Instr::Gather { axis, .. } => match operands {
            [Batched, Shared] => *axis != 0,
            // Shared rows picked by batched indices: the indices' rows become the output's.
            [Shared, Batched] => *axis == 0,
            _ => false,
        },
        Instr::Concat { axis, .. } => *axis != 0 && operands.iter().all(|k| *k == Batched),
        Instr::Slice { axis, .. } => *axis != 0 && operands[1..].iter().all(|k| *k == Shared),
        Instr::Expand { .. } => operands.get(1) == Some(&Shared),
        Instr::Const { .. } | Instr::GatherNd { .. } | Instr::Range { .. } => false,
    };
    keeps_rows.then_some(Batched)
}

/// Whether a batched value computed in a block of `rows` rows kept them: its first axis is the
/// block's rows, and where operands broadcast, batched ones line up with the output's axes while
/// shared ones are broadcast along the rows (a lower rank, or a first axis of 1).
fn keeps_rows(instr: &Instr, operands: &[&ITensor], kinds: &[Rows], out: &ITensor, rows: usize) -> bool {
    if out.shape.first() != Some(&rows) {
        return false;
    }
    let rank = out.shape.len();
    let lines_up = |x: &ITensor, kind: Rows| match kind {
        Rows::Batched => x.shape.len() == rank,
        Rows::Shared => x.shape.len() < rank || x.shape.first() == Some(&1),
    };
    match instr {
        // A product over the last axis: with a rank-1 operand that axis would be the rows.
        Instr::Dense { .. } => operands.first().is_some_and(|x| x.shape.len() >= 2),
        Instr::Expand { .. } => operands.first().is_some_and(|x| x.shape.len() == rank),
        // `[m, k] x [n, k]`: only the left operand's rows may be batched. With batch axes, they
        // broadcast like element-wise operands.
        Instr::MatMul { .. } if rank == 2 => kinds == [Rows::Batched, Rows::Shared],
        Instr::AddSub { .. }
        | Instr::Mul { .. }
        | Instr::Compare { .. }
        | Instr::Logic { .. }
        | Instr::Where { .. }
        | Instr::MatMul { .. } => operands.iter().zip(kinds).all(|(x, kind)| lines_up(x, *kind)),
        _ => true,
    }
}

/// The values of one block: its rows of the batched inputs, every shared input, then each
/// instruction's value; `None` when an instruction fails or does not keep rows.
fn run_block(
    plan: &Plan,
    inputs: &[ITensor],
    kinds: &[Rows],
    range: Range<usize>,
    options: &ExecOptions,
) -> Option<Vec<ITensor>> {
    let rows = range.len();
    let mut values: Vec<ITensor> = Vec::with_capacity(kinds.len());
    for (input, kind) in inputs.iter().zip(kinds) {
        values.push(match kind {
            Rows::Batched => {
                let width = input.data.len() / input.shape.first().copied().filter(|n| *n > 0)?;
                let mut shape = input.shape.clone();
                shape[0] = rows;
                ITensor {
                    shape,
                    data: input.data.get(range.start * width..range.end * width)?.to_vec(),
                }
            }
            Rows::Shared => input.clone(),
        });
    }
    for instr in &plan.instrs {
        let operand_values = instr.inputs();
        let operands: Vec<&ITensor> = operand_values.iter().map(|v| &values[*v as usize]).collect();
        let value = run_instr(instr, &operands, options).ok()?;
        if kinds[values.len()] == Rows::Batched {
            let operand_kinds: Vec<Rows> = operand_values.iter().map(|v| kinds[*v as usize]).collect();
            if !keeps_rows(instr, &operands, &operand_kinds, &value, rows) {
                return None;
            }
        }
        values.push(value);
    }
    Some(values.split_off(inputs.len()))
}

/// The blocks' values joined: batched ones concatenated along their rows (into the first
/// block's buffer), shared ones taken from the first block. `None` if a joined value would pass
/// the element limit or the blocks disagree on a shape beyond the rows.
fn join_blocks(blocks: Vec<Vec<ITensor>>, kinds: &[Rows], options: &ExecOptions) -> Option<Vec<ITensor>> {
    let mut blocks: Vec<std::vec::IntoIter<ITensor>> = blocks.into_iter().map(Vec::into_iter).collect();
    let (first_block, other_blocks) = blocks.split_first_mut()?;
    let mut joined = Vec::with_capacity(kinds.len());
    for kind in kinds {
        let mut value = first_block.next()?;
        let others: Vec<ITensor> = other_blocks.iter_mut().map(Iterator::next).collect::<Option<_>>()?;
        if *kind == Rows::Batched {
            let elements = others.iter().map(|x| x.data.len()).sum::<usize>() + value.data.len();
            if elements > options.max_elements || others.iter().any(|x| x.shape[1..] != value.shape[1..]) {
                return None;
            }
            value.data.reserve_exact(elements - value.data.len());
            for other in others {
                value.shape[0] += other.shape[0];
                value.data.extend_from_slice(&other.data);
            }
        }
        joined.push(value);
    }
    Some(joined)
}

/// A rough count of the products one batch row costs, to decide whether threads are worth
/// starting: weights times the positions they meet, estimated from the row's input elements.
fn products_per_row(plan: &Plan, elements_per_row: usize) -> usize {
    plan.instrs
        .iter()
        .map(|instr| match instr {
            Instr::Dense { k, n, .. } => {
                let positions = (elements_per_row / (*k as usize).max(1)).max(1);
                (*k as usize * *n as usize).saturating_mul(positions)
            }
            Instr::Conv { weights, c_in, .. } => {
                let positions = (elements_per_row / (*c_in as usize).max(1)).max(1);
                weights.len().saturating_mul(positions)
            }
            Instr::MatMul { .. } => elements_per_row.saturating_mul(elements_per_row),
            _ => 0,
        })
        .fold(0, usize::saturating_add)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixed::Multiplier;
    use crate::plan::{InputKind, PlanInput};
    use vouch_tensor::{NamedTensor, Tensor, TensorData, TensorLimits, read_tensor_file};

    const ONE: Multiplier = Multiplier { m: 1 << 30, shift: 30 };

    fn plan_of(input_shape: Vec<PlanDim>, instrs: Vec<Instr>) -> Plan {
        Plan {
            inputs: vec![PlanInput {
                name: "x".into(),
                kind: InputKind::Integer,
                shape: input_shape,
            }],
            instrs,
            outputs: vec![],
        }
    }

    fn batch() -> Vec<PlanDim> {
        vec![PlanDim::Symbol("batch".into()), PlanDim::Fixed(6)]
    }

    fn input(rows: usize, width: usize) -> ITensor {
        ITensor {
            shape: vec![rows, width],
            data: (0..rows * width).map(|i| (i as i32 * 7919) % 201 - 100).collect(),
        }
    }

    fn undivided(plan: &Plan, inputs: &[ITensor]) -> Vec<ITensor> {
        let options = ExecOptions {
            threads: 1,
            ..ExecOptions::default()
        };
        let mut values = inputs.to_vec();
        super::super::run_undivided(plan, &mut values, &options).expect("undivided run");
        values.split_off(inputs.len())
    }

    fn in_blocks(plan: &Plan, inputs: &[ITensor], threads: usize) -> Option<Vec<ITensor>> {
        let options = ExecOptions {
            threads,
            ..ExecOptions::default()
        };
        run_in_row_blocks_above(plan, inputs, &options, 0)
    }

    /// A plan whose every instruction keeps rows apart: products, broadcasts against shared
    /// constants, a softmax and a reduction over other axes, new axes, a concatenation and a
    /// slice along columns, and the width read as a value.
    fn row_wise_plan() -> Plan {
        plan_of(
            batch(),
            vec![
                Instr::Dense {
                    input: 0,
                    k: 6,
                    n: 4,
                    weights: (0..24).map(|i| (i * 37 % 255 - 127) as i8).collect(),
                    bias: vec![5, -3, 0, 100],
                    requant: vec![Multiplier { m: 1 << 30, shift: 33 }; 4],
                    low: -32767,
                    high: 32767,
                },
                Instr::Const {
                    shape: vec![4],
                    data: vec![1, -2, 3, -4],
                },
                Instr::AddSub {
                    a: 1,
                    b: 2,
                    scale_a: ONE,
                    scale_b: ONE,
                    subtract: false,
                },
                Instr::Const {
                    shape: vec![1, 4],
                    data: vec![2, 2, -1, 3],
                },
                Instr::Mul {
                    a: 3,
                    b: 4,
                    requant: ONE,
                },
                Instr::Concat {
                    inputs: vec![3, 5, 0],
                    axis: 1,
                },
                Instr::Softmax {
                    input: 6,
                    axis: 1,
                    exp_table: (0..64).map(|d| 65536 >> (d / 4)).collect(),
                    masked: false,
                },
                Instr::AddAxis { input: 7, axis: 1 },
                Instr::ReduceMinMax {
                    input: 8,
                    axes: vec![2],
                    max: true,
                },
                Instr::Dim { input: 0, axis: 1 },
                Instr::Const {
                    shape: vec![],
                    data: vec![2],
                },
                Instr::Slice {
                    input: 6,
                    axis: 1,
                    start: 11,
                    end: 10,
                },
                Instr::Const {
                    shape: vec![4, 6],
                    data: (0..24).map(|i| i % 7 - 3).collect(),
                },
                // `[batch, 6] x [4, 6]`: the batched operand's rows give the output's.
                Instr::MatMul {
                    a: 0,
                    b: 13,
                    requant: ONE,
                },
            ],
        )
    }

    #[test]
    fn a_batch_run_in_row_blocks_gives_the_undivided_values() {
        let plan = row_wise_plan();
        for rows in [2, 3, 7, 40] {
            let inputs = [input(rows, 6)];
            let whole = undivided(&plan, &inputs);
            for threads in [2, 3, 8] {
                let blocks = in_blocks(&plan, &inputs, threads);
                assert_eq!(blocks.as_ref(), Some(&whole), "rows {rows} threads {threads}");
            }
        }
    }

    #[test]
    fn plans_that_mix_rows_are_not_cut() {
        let reduce_rows = plan_of(
            batch(),
            vec![Instr::ReduceMinMax {
                input: 0,
                axes: vec![0, 1],
                max: true,
            }],
        );
        let count_rows = plan_of(batch(), vec![Instr::Dim { input: 0, axis: 0 }]);
        let join_rows = plan_of(
            batch(),
            vec![Instr::Concat {
                inputs: vec![0, 0],
                axis: 0,
            }],
        );
        let fixed_batch = plan_of(
            vec![PlanDim::Fixed(4), PlanDim::Fixed(6)],
            vec![Instr::Clamp {
                input: 0,
                low: 0,
                high: 10,
            }],
        );
        for plan in [reduce_rows, count_rows, join_rows, fixed_batch] {
            assert_eq!(
                row_kinds(&plan).filter(|k| k[0] == Rows::Batched),
                None,
                "{:?}",
                plan.instrs
            );
            assert_eq!(in_blocks(&plan, &[input(4, 6)], 2), None);
        }
    }

    #[test]
    fn a_shared_value_with_the_batch_as_its_rows_stops_the_cut() {
        // Adding a constant of 4 rows to a batch of 4 is fine undivided; a block of 2 rows would
        // broadcast against it wrongly (1 row) or fail (2 rows), so the blocks decline.
        let plan = plan_of(
            batch(),
            vec![
                Instr::Const {
                    shape: vec![4, 6],
                    data: (0..24).collect(),
                },
                Instr::AddSub {
                    a: 0,
                    b: 1,
                    scale_a: ONE,
                    scale_b: ONE,
                    subtract: true,
                },
            ],
        );
        assert!(row_kinds(&plan).is_some());
        for threads in [2, 4] {
            assert_eq!(in_blocks(&plan, &[input(4, 6)], threads), None, "threads {threads}");
        }
        // A product over a batched vector contracts the rows.
        let vector = plan_of(
            vec![PlanDim::Symbol("batch".into())],
            vec![Instr::Dense {
                input: 0,
                k: 4,
                n: 4,
                weights: vec![1; 16],
                bias: vec![0; 4],
                requant: vec![ONE; 4],
                low: -32767,
                high: 32767,
            }],
        );
        let column = ITensor {
            shape: vec![4],
            data: vec![1, 2, 3, 4],
        };
        assert_eq!(in_blocks(&vector, &[column], 4), None);
        // `[2, 6] x [batch, 6]`: the batch becomes the output's columns. A block of 2 rows gives
        // a `[2, 2]` value, whose first axis has the block's size by coincidence.
        let columns = plan_of(
            batch(),
            vec![
                Instr::Const {
                    shape: vec![2, 6],
                    data: vec![1; 12],
                },
                Instr::MatMul {
                    a: 1,
                    b: 0,
                    requant: ONE,
                },
            ],
        );
        assert!(row_kinds(&columns).is_some());
        assert_eq!(in_blocks(&columns, &[input(4, 6)], 2), None);
    }

    /// The trained digit classifiers keep rows apart; a batch of 32 images is worth two threads
    /// to the CNN, and of 64 to the MLP (about a third of the CNN's work per row), while small
    /// batches run undivided.
    #[test]
    fn the_digit_classifiers_run_in_row_blocks() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
        let read = |path: &str| read_tensor_file(&fixtures.join(path), &TensorLimits::default()).expect("fixture");
        let calibration = read("data/digits_calibration.npz");
        let test = read("data/digits_test.npz");
        let TensorData::F32(pixels) = test[0].tensor.data() else {
            panic!("the digits are float32");
        };
        let width = test[0].tensor.shape()[1];
        let first_rows = |count: usize| {
            [NamedTensor {
                name: test[0].name.clone(),
                tensor: Tensor::new(vec![count, width], TensorData::F32(pixels[..count * width].to_vec()))
                    .expect("rows"),
            }]
        };
        let options = ExecOptions {
            threads: 2,
            ..ExecOptions::default()
        };
        for (model, worth_dividing) in [("digits_cnn", 32), ("digits_mlp_v1", 64)] {
            let bytes = std::fs::read(fixtures.join(format!("models/{model}.onnx"))).expect("model");
            let loaded = crate::load_onnx(&bytes).expect("load");
            let plan = crate::build_plan(&loaded, &loaded.to_ir().expect("ir"), &calibration).expect("plan");
            let inputs = super::super::bind_inputs(&plan, &first_rows(worth_dividing), true).expect("bind");
            let blocks = run_in_row_blocks(&plan, &inputs, &options);
            assert!(
                blocks == Some(undivided(&plan, &inputs)),
                "{model}: divided, same values"
            );
            let few = super::super::bind_inputs(&plan, &first_rows(4), true).expect("bind");
            assert!(
                run_in_row_blocks(&plan, &few, &options).is_none(),
                "{model}: 4 rows undivided"
            );
        }
    }
}
