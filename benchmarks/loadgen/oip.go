package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// The Open Inference Protocol (KServe v2, Triton's gRPC API): one ModelInfer per photo, the
// photo as a BYTES input of shape [1, 1]. Our server (protos/oip) and NVIDIA Triton serving a
// classifier bound the same way (python -m snaplearn_bench.peer_servers triton) both answer it.
const (
	oipModelInfer = "/inference.GRPCInferenceService/ModelInfer"
	oipInputName  = "IMAGE"
	// A reply without any output tensor: the server answered OK but classified nothing.
	oipNoOutput = "NO_OUTPUT"
)

// oipCodec passes pre-encoded message bytes through (named "proto": the content-type stays
// application/grpc+proto), so that a request costs no marshalling per call.
type oipCodec struct{}

func (oipCodec) Marshal(v any) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("oipCodec: cannot marshal %T", v)
	}
	return *b, nil
}

func (oipCodec) Unmarshal(data []byte, v any) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("oipCodec: cannot unmarshal into %T", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

func (oipCodec) Name() string { return "proto" }

// oipInferRequest is the wire encoding of a ModelInferRequest for `model` with `image` as its
// one BYTES element, carried in raw_input_contents (a 4-byte little-endian length, then the
// bytes), as tritonclient and perf_analyzer send it.
func oipInferRequest(model string, image []byte) []byte {
	var tensor []byte
	tensor = protowire.AppendTag(tensor, 1, protowire.BytesType) // name
	tensor = protowire.AppendString(tensor, oipInputName)
	tensor = protowire.AppendTag(tensor, 2, protowire.BytesType) // datatype
	tensor = protowire.AppendString(tensor, "BYTES")
	var shape []byte // packed repeated int64: [1, 1]
	shape = protowire.AppendVarint(shape, 1)
	shape = protowire.AppendVarint(shape, 1)
	tensor = protowire.AppendTag(tensor, 3, protowire.BytesType)
	tensor = protowire.AppendBytes(tensor, shape)

	raw := binary.LittleEndian.AppendUint32(make([]byte, 0, 4+len(image)), uint32(len(image)))
	raw = append(raw, image...)

	var request []byte
	request = protowire.AppendTag(request, 1, protowire.BytesType) // model_name
	request = protowire.AppendString(request, model)
	request = protowire.AppendTag(request, 5, protowire.BytesType) // inputs
	request = protowire.AppendBytes(request, tensor)
	request = protowire.AppendTag(request, 7, protowire.BytesType) // raw_input_contents
	request = protowire.AppendBytes(request, raw)
	return request
}

// oipOutputs counts the output tensors (field 5) of a ModelInferResponse; -1 if malformed.
func oipOutputs(reply []byte) int {
	outputs := 0
	for len(reply) > 0 {
		number, kind, n := protowire.ConsumeTag(reply)
		if n < 0 {
			return -1
		}
		reply = reply[n:]
		if number == 5 && kind == protowire.BytesType {
			outputs++
		}
		if n = protowire.ConsumeFieldValue(number, kind, reply); n < 0 {
			return -1
		}
		reply = reply[n:]
	}
	return outputs
}

// oipCaller sends ModelInfer calls round-robin over its connections (as grpcCaller does).
type oipCaller struct {
	requests [][]byte // each photo's ModelInferRequest, encoded once
	conns    []*grpc.ClientConn
}

func newOIPCaller(target, model string, connections int, images [][]byte) (*oipCaller, error) {
	conns, err := dial(target, connections)
	if err != nil {
		return nil, err
	}
	c := &oipCaller{conns: conns}
	for _, image := range images {
		c.requests = append(c.requests, oipInferRequest(model, image))
	}
	return c, nil
}

func (c *oipCaller) call(client, image int, timeout time.Duration) (string, int) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var reply []byte
	err := c.conns[client%len(c.conns)].Invoke(ctx, oipModelInfer, &c.requests[image], &reply,
		grpc.ForceCodec(oipCodec{}))
	if err != nil {
		st := status.Convert(err)
		return grpcCodeName(st.Code()), 0
	}
	if oipOutputs(reply) < 1 {
		return oipNoOutput, 0
	}
	return "OK", 0 // the protocol does not say how the server batched it
}

func (c *oipCaller) close() { closeAll(c.conns) }
