//! Casts on the exact path, which the ONNX backend tests cover only between exotic float types:
//! a small graph built here casts integer inputs to float (a value to quantize) and to bool (a
//! condition), and the exact plan must agree with the float path.

use prost::Message;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto, tensor_shape_proto, type_proto,
};
use vouch_engine::{ExecOptions, FloatModel, build_plan, execute, load_onnx};
use vouch_tensor::{NamedTensor, Tensor, TensorData};

const FLOAT: i32 = 1;
const INT64: i32 = 7;
const BOOL: i32 = 9;

fn value(name: &str, elem_type: i32, len: i64) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type,
                shape: Some(TensorShapeProto {
                    dim: vec![tensor_shape_proto::Dimension {
                        value: Some(tensor_shape_proto::dimension::Value::DimValue(len)),
                        ..Default::default()
                    }],
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op_type: &str, inputs: &[&str], output: &str, cast_to: Option<i64>) -> NodeProto {
    NodeProto {
        op_type: op_type.into(),
        name: output.into(),
        input: inputs.iter().map(|s| (*s).to_owned()).collect(),
        output: vec![output.into()],
        attribute: cast_to
            .map(|to| AttributeProto {
                name: "to".into(),
                r#type: 2, // INT
                i: to,
                ..Default::default()
            })
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

/// `scaled = Cast<float>(ids) * x` and `kept = Where(Cast<bool>(ids), x, 0)`.
fn cast_model(len: i64) -> Vec<u8> {
    let zero = TensorProto {
        name: "zero".into(),
        data_type: FLOAT,
        float_data: vec![0.0],
        ..Default::default()
    };
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            name: "casts".into(),
            node: vec![
                node("Cast", &["ids"], "ids_float", Some(i64::from(FLOAT))),
                node("Mul", &["ids_float", "x"], "scaled", None),
                node("Cast", &["ids"], "ids_bool", Some(i64::from(BOOL))),
                node("Where", &["ids_bool", "x", "zero"], "kept", None),
            ],
            initializer: vec![zero],
            input: vec![value("ids", INT64, len), value("x", FLOAT, len)],
            output: vec![value("scaled", FLOAT, len), value("kept", FLOAT, len)],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn casts_to_float_and_bool_match_the_float_path() {
    let ids: Vec<i64> = vec![0, 3, 1, 0, 7, 2, 0, 5];
    let x: Vec<f32> = vec![0.5, -1.25, 2.0, 3.5, -0.75, 1.0, -2.5, 0.125];
    let inputs = vec![
        NamedTensor {
            name: Some("ids".into()),
            tensor: Tensor::new(vec![ids.len()], TensorData::I64(ids)).expect("ids"),
        },
        NamedTensor {
            name: Some("x".into()),
            tensor: Tensor::new(vec![x.len()], TensorData::F32(x)).expect("x"),
        },
    ];
    let model = load_onnx(&cast_model(8)).expect("model");
    let graph = model.to_ir().expect("ir");
    let plan = build_plan(&model, &graph, &inputs).expect("plan");
    // int64 to float is a rescale into the quantized domain; int64 to bool a comparison with 0.
    let names: Vec<&str> = plan.instrs.iter().map(|i| i.name()).collect();
    assert!(
        names.contains(&"Rescale") && names.contains(&"Compare") && names.contains(&"Where"),
        "{names:?}"
    );
    let exact = execute(&plan, &inputs, &ExecOptions::default()).expect("exact");
    let float = FloatModel::new(&model)
        .expect("float")
        .run(&inputs, 1)
        .expect("float run");
    assert_eq!(exact.outputs.len(), 2);
    for (got, want) in exact.outputs.iter().zip(&float) {
        assert_eq!(got.name, want.name);
        let (TensorData::F32(got), TensorData::F32(want)) = (got.tensor.data(), want.tensor.data()) else {
            panic!("float outputs expected");
        };
        let amax = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-3 * amax, "{g} against {w}");
        }
    }
}
