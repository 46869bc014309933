// Command snaplearn-example shows the whole SnapLearn flow from a Go app: classify a photo
// with the vision server, wait until the recommender has learned from it, then ask what the
// student should practise next.
//
//	go run ./cmd/snaplearn-example -image photo.jpg -user student-42
//
// It prints the same lines as the Java and TypeScript examples (tests/e2e/test_app_clients.py
// reads them):
//
//	classified as fractions (score 0.981, model worksheet-topics v1)
//	recommendations for student-42 (snapshot 7, 12 events applied, cold start false):
//	  1. Fraction basics (video, grade 4) [fractions] practises fractions, seen in your recent photos
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
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
	imagePath := flag.String("image", "", "photo to classify (JPEG, PNG, WebP, BMP)")
	user := flag.String("user", "go-example", "student id")
	k := flag.Uint("k", 5, "how many practice items")
	wait := flag.Duration("wait", 30*time.Second, "how long to wait for the recommender to learn from the photo")
	flag.Parse()
	if *imagePath == "" {
		fmt.Fprintln(os.Stderr, "usage: snaplearn-example -image photo.jpg [-user id] [-vision host:port] [-recommender host:port]")
		os.Exit(2)
	}
	if err := run(*visionTarget, *recommenderTarget, *imagePath, *user, uint32(*k), *wait); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

func dial(target string) (*grpc.ClientConn, error) {
	return grpc.NewClient(target,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultServiceConfig(serviceConfig),
	)
}

func run(visionTarget, recommenderTarget, imagePath, user string, k uint32, wait time.Duration) error {
	image, err := os.ReadFile(imagePath)
	if err != nil {
		return err
	}
	visionConn, err := dial(visionTarget)
	if err != nil {
		return err
	}
	defer visionConn.Close()
	recommenderConn, err := dial(recommenderTarget)
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
