// Command snaplearn-example shows the whole SnapLearn flow from a Go app: classify a photo
// with the vision server, wait until the recommender has learned from it, then ask what the
// student should practise next.
//
//	go run ./cmd/snaplearn-example -image photo.jpg -user student-42
//	SNAPLEARN_TOKEN=... go run ./cmd/snaplearn-example -tls-ca ca.pem -image photo.jpg -user school-a/s42
//
// With -tls-ca it speaks TLS (-tls-cert/-tls-key add a client certificate for mutual TLS); a
// bearer token is read from SNAPLEARN_TOKEN, never from a flag, which any process listing shows.
// It prints the same lines as the Java and TypeScript examples (tests/e2e/test_app_clients.py
// reads them):
//
//	classified as fractions (score 0.981, model worksheet-topics v1)
//	recommendations for student-42 (snapshot 7, 12 events applied, cold start false):
//	  1. Fraction basics (video, grade 4) [fractions] practises fractions, seen in your recent photos
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	recommenderv1 "github.com/snaplearn/snaplearn/protos/go/gen/snaplearn/recommender/v1"
	visionv1 "github.com/snaplearn/snaplearn/protos/go/gen/snaplearn/vision/v1"
)

// round_robin spreads calls over every address the target resolves to (one per vision pod
// behind a headless Service); UNAVAILABLE (a pod restarting, a connection reset) is retried with
// backoff, other codes are final.
const serviceConfig = `{"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [{
  "name": [{"service": "snaplearn.vision.v1.VisionService"}, {"service": "snaplearn.recommender.v1.RecommenderService"}],
  "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "2s",
                  "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}`

func main() {
	visionTarget := flag.String("vision", "127.0.0.1:50051", "vision server host:port (dns:///name:port for round-robin over a headless Service)")
	recommenderTarget := flag.String("recommender", "127.0.0.1:50052", "recommender host:port")
	imagePath := flag.String("image", "", "photo to classify (JPEG, PNG, WebP, BMP, GIF or TIFF)")
	user := flag.String("user", "go-example", "student id")
	k := flag.Uint("k", 5, "how many practice items")
	wait := flag.Duration("wait", 30*time.Second, "how long to wait for the recommender to learn from the photo")
	tlsCA := flag.String("tls-ca", "", "PEM CA that signed the servers' certificates (enables TLS)")
	tlsCert := flag.String("tls-cert", "", "client certificate, where the servers require mutual TLS")
	tlsKey := flag.String("tls-key", "", "the client certificate's key")
	serverName := flag.String("server-name", "", "a name in the servers' certificates, when the targets are addresses")
	flag.Parse()
	if *imagePath == "" {
		fmt.Fprintln(os.Stderr, "usage: snaplearn-example -image photo.jpg [-user id] [-vision host:port] [-recommender host:port]")
		os.Exit(2)
	}
	options, err := dialOptions(*tlsCA, *tlsCert, *tlsKey, *serverName, os.Getenv("SNAPLEARN_TOKEN"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(2)
	}
	if err := run(options, *visionTarget, *recommenderTarget, *imagePath, *user, uint32(*k), *wait); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

// bearerToken sends "authorization: Bearer <token>" with every call.
type bearerToken struct {
	token  string
	secure bool
}

func (b bearerToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

// RequireTransportSecurity is false only for plaintext, which the servers accept for localhost
// development; anywhere else use TLS, or the token travels readable.
func (b bearerToken) RequireTransportSecurity() bool { return b.secure }

func dialOptions(caFile, certFile, keyFile, serverName, token string) ([]grpc.DialOption, error) {
	options := []grpc.DialOption{grpc.WithDefaultServiceConfig(serviceConfig)}
	if (certFile == "") != (keyFile == "") {
		return nil, errors.New("-tls-cert and -tls-key go together")
	}
	if caFile == "" {
		if certFile != "" {
			return nil, errors.New("-tls-cert needs -tls-ca")
		}
		options = append(options, grpc.WithTransportCredentials(insecure.NewCredentials()))
	} else {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, err
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s holds no PEM certificate", caFile)
		}
		config := &tls.Config{RootCAs: roots, ServerName: serverName, MinVersion: tls.VersionTLS12}
		if certFile != "" {
			pair, err := tls.LoadX509KeyPair(certFile, keyFile)
			if err != nil {
				return nil, err
			}
			config.Certificates = []tls.Certificate{pair}
		}
		options = append(options, grpc.WithTransportCredentials(credentials.NewTLS(config)))
	}
	if token != "" {
		options = append(options, grpc.WithPerRPCCredentials(bearerToken{token: token, secure: caFile != ""}))
	}
	return options, nil
}

func run(options []grpc.DialOption, visionTarget, recommenderTarget, imagePath, user string, k uint32, wait time.Duration) error {
	image, err := os.ReadFile(imagePath)
	if err != nil {
		return err
	}
	visionConn, err := grpc.NewClient(visionTarget, options...)
	if err != nil {
		return err
	}
	defer visionConn.Close()
	recommenderConn, err := grpc.NewClient(recommenderTarget, options...)
	if err != nil {
		return err
	}
	defer recommenderConn.Close()
	vision := visionv1.NewVisionServiceClient(visionConn)
	recommender := recommenderv1.NewRecommenderServiceClient(recommenderConn)

	// Every call gets a deadline: a server that is gone must not hang the app.
	call := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), 10*time.Second)
	}

	ctx, cancel := call()
	before, err := recommender.Recommend(ctx, &recommenderv1.RecommendRequest{UserId: user, K: 1})
	cancel()
	if err != nil {
		return fmt.Errorf("recommend: %w", err)
	}

	ctx, cancel = call()
	classified, err := vision.Classify(ctx, &visionv1.ClassifyRequest{UserId: user, Image: image, TopK: 3})
	cancel()
	if err != nil {
		return fmt.Errorf("classify: %w", err)
	}
	if len(classified.Labels) == 0 {
		return fmt.Errorf("classify returned no labels")
	}
	top := classified.Labels[0]
	fmt.Printf("classified as %s (score %.3f, model %s v%s)\n",
		top.Label, top.Score, classified.ModelName, classified.ModelVersion)

	// The photo reaches the recommender as an event; poll until a snapshot has applied it.
	deadline := time.Now().Add(wait)
	for {
		ctx, cancel = call()
		reply, err := recommender.Recommend(ctx, &recommenderv1.RecommendRequest{UserId: user, K: k})
		cancel()
		if err != nil {
			return fmt.Errorf("recommend: %w", err)
		}
		if reply.EventsApplied > before.EventsApplied && !reply.ColdStart {
			printRecommendations(user, reply)
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the recommender did not apply the photo's event within %s", wait)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func printRecommendations(user string, reply *recommenderv1.RecommendResponse) {
	fmt.Printf("recommendations for %s (snapshot %s, %d events applied, cold start %t):\n",
		user, reply.ModelVersion, reply.EventsApplied, reply.ColdStart)
	for i, item := range reply.Items {
		fmt.Printf("  %d. %s [%s] %s\n", i+1, item.Title, strings.Join(item.Concepts, ", "), item.Reason)
	}
}
