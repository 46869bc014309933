package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	visionv1 "github.com/snaplearn/snaplearn/protos/go/gen/snaplearn/vision/v1"
)

// caller sends one request with payload `image` (an index into the photos it was given) and
// returns (status name, server batch size or 0); it never fails.
type caller interface {
	// call sends image as client `client`: a closed loop's caller keeps one client (one
	// connection, one user), an open loop's requests take the clients in turn.
	call(client, image int, timeout time.Duration) (string, int)
	close()
}

// What grpc answers over a server's maximum_concurrent_rpcs, counted apart from our refusals.
const (
	grpcCapDetails = "Concurrent RPC limit exceeded!"
	grpcCapStatus  = "RESOURCE_EXHAUSTED_GRPC_CAP"
)

// grpcCodeNames are the names Python's grpc.StatusCode uses (codes.Code.String() is CamelCase).
var grpcCodeNames = map[codes.Code]string{
	codes.OK:                 "OK",
	codes.Canceled:           "CANCELLED",
	codes.Unknown:            "UNKNOWN",
	codes.InvalidArgument:    "INVALID_ARGUMENT",
	codes.DeadlineExceeded:   "DEADLINE_EXCEEDED",
	codes.NotFound:           "NOT_FOUND",
	codes.AlreadyExists:      "ALREADY_EXISTS",
	codes.PermissionDenied:   "PERMISSION_DENIED",
	codes.ResourceExhausted:  "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION",
	codes.Aborted:            "ABORTED",
	codes.OutOfRange:         "OUT_OF_RANGE",
	codes.Unimplemented:      "UNIMPLEMENTED",
	codes.Internal:           "INTERNAL",
	codes.Unavailable:        "UNAVAILABLE",
	codes.DataLoss:           "DATA_LOSS",
	codes.Unauthenticated:    "UNAUTHENTICATED",
}

func grpcCodeName(code codes.Code) string {
	if name, ok := grpcCodeNames[code]; ok {
		return name
	}
	return strconv.FormatUint(uint64(code), 10)
}

// grpcCaller spreads calls round-robin over its connections, as several independent clients
// would (a server with worker processes behind one port spreads connections, not calls).
type grpcCaller struct {
	images [][]byte
	conns  []*grpc.ClientConn
	stubs  []visionv1.VisionServiceClient
}

// dial opens `connections` plaintext gRPC connections to target (each its own HTTP/2 connection).
func dial(target string, connections int) ([]*grpc.ClientConn, error) {
	var conns []*grpc.ClientConn
	for range connections {
		conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			closeAll(conns)
			return nil, err
		}
		conns = append(conns, conn)
	}
	return conns, nil
}

func closeAll(conns []*grpc.ClientConn) {
	for _, conn := range conns {
		conn.Close()
	}
}

func newGRPCCaller(target string, connections int, images [][]byte) (*grpcCaller, error) {
	conns, err := dial(target, connections)
	if err != nil {
		return nil, err
	}
	c := &grpcCaller{images: images, conns: conns}
	for _, conn := range conns {
		c.stubs = append(c.stubs, visionv1.NewVisionServiceClient(conn))
	}
	return c, nil
}

func (c *grpcCaller) call(client, image int, timeout time.Duration) (string, int) {
	stub := c.stubs[client%len(c.stubs)]
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	reply, err := stub.Classify(ctx, &visionv1.ClassifyRequest{UserId: "bench-" + strconv.Itoa(client%1000), Image: c.images[image]})
	if err != nil {
		st := status.Convert(err)
		if st.Code() == codes.ResourceExhausted && st.Message() == grpcCapDetails {
			return grpcCapStatus, 0 // grpc's own cap refused it, before the server's code
		}
		return grpcCodeName(st.Code()), 0
	}
	return "OK", int(reply.GetBatchSize())
}

func (c *grpcCaller) close() { closeAll(c.conns) }

// httpCaller POSTs {"image": base64} JSON (LitServe), over at most `connections` connections.
type httpCaller struct {
	url    string
	client *http.Client
	bodies [][]byte // the request body of each photo, encoded once
}

func newHTTPCaller(url string, connections int, images [][]byte) *httpCaller {
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.MaxIdleConns = connections
	transport.MaxIdleConnsPerHost = connections
	transport.MaxConnsPerHost = connections
	c := &httpCaller{url: url, client: &http.Client{Transport: transport}}
	for _, image := range images {
		c.bodies = append(c.bodies, []byte(`{"image": "`+base64.StdEncoding.EncodeToString(image)+`"}`))
	}
	return c
}

func (c *httpCaller) call(_, image int, timeout time.Duration) (string, int) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	request, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url, bytes.NewReader(c.bodies[image]))
	if err != nil {
		return httpErrorName(err), 0
	}
	request.Header.Set("Content-Type", "application/json")
	response, err := c.client.Do(request)
	if err != nil {
		return httpErrorName(err), 0
	}
	payload, err := io.ReadAll(response.Body)
	response.Body.Close()
	if err != nil {
		return httpErrorName(err), 0
	}
	if response.StatusCode != http.StatusOK {
		return "HTTP_" + strconv.Itoa(response.StatusCode), 0
	}
	var reply struct {
		BatchSize *float64 `json:"batch_size"`
	}
	if err := json.Unmarshal(payload, &reply); err != nil {
		return "INVALID_RESPONSE", 0 // pyloadgen.py would crash here
	}
	if reply.BatchSize == nil {
		return "OK", 0
	}
	return "OK", int(*reply.BatchSize)
}

// httpErrorName names a transport error like aiohttp would, roughly: a timeout is
// DEADLINE_EXCEEDED, a failed connect ClientConnectorError, a dropped connection
// ServerDisconnectedError, anything else its Go type.
func httpErrorName(err error) string {
	var netErr net.Error
	var opErr *net.OpError
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &netErr) && netErr.Timeout():
		return "DEADLINE_EXCEEDED"
	case errors.As(err, &opErr) && opErr.Op == "dial":
		return "ClientConnectorError"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return "ServerDisconnectedError"
	}
	for {
		next := errors.Unwrap(err)
		if next == nil {
			break
		}
		err = next
	}
	name := fmt.Sprintf("%T", err)
	name = name[strings.LastIndex(name, ".")+1:]
	return strings.TrimLeft(name, "*")
}

func (c *httpCaller) close() { c.client.CloseIdleConnections() }
